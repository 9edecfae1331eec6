//! The connect / stream / reconnect loop.

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::apply::{Cache, Verdict};
use crate::backoff::Retry;
use crate::transport::{Transport, error_chain};
use crate::{Config, Handler, MAX_MESSAGE_BYTES, Status, Variant};

/// Why a stream (or the attempt to open one) ended.
enum End {
    Connect(tonic::transport::Error),
    Rpc(tonic::Status),
    Closed,
}

pub(crate) struct Client<H> {
    config: Config,
    transport: Transport,
    handler: H,
    events: watch::Sender<Status>,
    cache: Cache,
    retry: Retry,
    /// Type of `Status::last_nack`, to clear it when that type is accepted again.
    nacked_type: Option<String>,
}

impl<H: Handler> Client<H> {
    pub(crate) fn new(config: Config, transport: Transport, handler: H, events: watch::Sender<Status>) -> Self {
        let cache = Cache::new(&config.type_urls);
        let retry = Retry::new(config.backoff);
        Self { config, transport, handler, events, cache, retry, nacked_type: None }
    }

    pub(crate) async fn run(mut self) -> ! {
        let span = info_span!("xds", variant = ?self.config.variant);
        async move {
            if self.config.endpoint.starts_with("http://") && (self.config.ca_pem.is_some() || self.config.skip_verify) {
                warn!(endpoint = %self.config.endpoint, "plain-text endpoint: the CA / skip-verify settings are ignored");
            }
            loop {
                let mut delivered = false;
                let end = self.session(&mut delivered).await;
                let message = self.report(&end);
                self.events.send_modify(|s| {
                    s.connected = false;
                    s.last_error = Some(message);
                });
                if delivered {
                    self.retry.reset();
                }
                let delay = self.retry.next_delay();
                debug!(?delay, "reconnecting after");
                tokio::time::sleep(delay).await;
            }
        }
        .instrument(span)
        .await
    }

    /// Logs why the stream ended, at a level matching whose fault it is; returns the sentence for `Status`.
    fn report(&self, end: &End) -> String {
        let server = &self.transport.display;
        match end {
            End::Connect(e) => {
                let chain = error_chain(e);
                let hint = if chain.contains("certificate") || chain.contains("CertificateUnknown") {
                    "; check that the configured CA certificate signed the control plane's certificate and that it is valid for the server name"
                } else {
                    ""
                };
                let message = format!("cannot connect to the control plane at {server}: {chain}{hint}");
                warn!("{message}");
                message
            }
            End::Rpc(status) => {
                let code = status.code();
                let mut detail = status.message().to_string();
                if let Some(source) = std::error::Error::source(status) {
                    detail.push_str(": ");
                    detail.push_str(&error_chain(source));
                }
                match code {
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                        let message = format!(
                            "the control plane at {server} refused the data plane's credentials ({code:?}): {detail}; check the data plane token"
                        );
                        error!("{message}");
                        message
                    }
                    _ => {
                        let message = format!("the ADS stream to {server} failed ({code:?}): {detail}");
                        warn!("{message}");
                        message
                    }
                }
            }
            End::Closed => {
                let message = format!("the control plane at {server} closed the ADS stream");
                info!("{message}");
                message
            }
        }
    }

    async fn session(&mut self, delivered: &mut bool) -> End {
        let channel = match self.transport.endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return End::Connect(e),
        };
        match self.config.variant {
            Variant::Sotw => self.sotw(channel, delivered).await,
            Variant::Delta => self.delta(channel, delivered).await,
        }
    }

    fn client(channel: Channel) -> AggregatedDiscoveryServiceClient<Channel> {
        AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        if let Some(token) = &self.transport.token {
            request.metadata_mut().insert("authorization", token.clone());
        }
        request
    }

    async fn sotw(&mut self, channel: Channel, delivered: &mut bool) -> End {
        let (tx, rx) = mpsc::unbounded_channel();
        for (i, type_url) in self.config.type_urls.iter().enumerate() {
            let node = (i == 0).then(|| self.config.node.clone());
            // Wildcard: no resource names; a new stream always starts from an empty version.
            let _ = tx.send(DiscoveryRequest { type_url: type_url.clone(), node, ..Default::default() });
        }
        let request = self.request(UnboundedReceiverStream::new(rx));
        let mut stream = match Self::client(channel).stream_aggregated_resources(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return End::Rpc(status),
        };
        self.stream_opened();
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    *delivered = true;
                    let type_url = response.type_url.clone();
                    let (reply, verdict) = self.cache.on_sotw(response, &mut self.handler);
                    self.publish(&type_url, verdict);
                    if tx.send(reply).is_err() {
                        return End::Closed;
                    }
                }
                Ok(None) => return End::Closed,
                Err(status) => return End::Rpc(status),
            }
        }
    }

    async fn delta(&mut self, channel: Channel, delivered: &mut bool) -> End {
        let (tx, rx) = mpsc::unbounded_channel();
        for (i, type_url) in self.config.type_urls.iter().enumerate() {
            let node = (i == 0).then(|| self.config.node.clone());
            // Legacy wildcard (empty subscribe list) + what we already hold, so only changes come back.
            let _ = tx.send(DeltaDiscoveryRequest {
                type_url: type_url.clone(),
                node,
                initial_resource_versions: self.cache.held_versions(type_url),
                ..Default::default()
            });
        }
        let request = self.request(UnboundedReceiverStream::new(rx));
        let mut stream = match Self::client(channel).delta_aggregated_resources(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return End::Rpc(status),
        };
        self.stream_opened();
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    *delivered = true;
                    let type_url = response.type_url.clone();
                    let (reply, verdict) = self.cache.on_delta(response, &mut self.handler);
                    self.publish(&type_url, verdict);
                    if tx.send(reply).is_err() {
                        return End::Closed;
                    }
                }
                Ok(None) => return End::Closed,
                Err(status) => return End::Rpc(status),
            }
        }
    }

    fn stream_opened(&self) {
        info!(server = %self.transport.display, "ADS stream open");
        self.events.send_modify(|s| s.connected = true);
    }

    fn publish(&mut self, type_url: &str, verdict: Verdict) {
        let clear_nack = match &verdict {
            Verdict::Ack => self.nacked_type.as_deref() == Some(type_url),
            Verdict::Nack(_) => false,
        };
        if clear_nack {
            self.nacked_type = None;
        }
        if let Verdict::Nack(_) = verdict {
            self.nacked_type = Some(type_url.to_string());
        }
        let acked = &self.cache.acked;
        self.events.send_modify(|s| {
            s.connected = true;
            s.last_error = None;
            if s.acked_types != *acked {
                s.acked_types = acked.clone();
            }
            match verdict {
                Verdict::Nack(reason) => s.last_nack = Some(format!("{type_url}: {reason}")),
                Verdict::Ack if clear_nack => s.last_nack = None,
                Verdict::Ack => {}
            }
        });
    }
}
