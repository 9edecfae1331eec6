//! Peer chains a TLS context has already verified, so that a peer presenting the same
//! chain again is not verified again.
//!
//! In a mesh a sidecar's peers present the same certificate on every connection until it
//! rotates (a day, by Kuma's default), and checking the CA's signature on it is an ECDSA
//! verification: about a tenth of a full handshake's CPU. Whether a chain is accepted
//! depends only on its bytes, on the context's CA store and rules (SAN matchers, SPIFFE
//! trust domains), which a context never changes, and on the time, which is kept as the
//! window in which every certificate of the verified chain is valid. So a context keeps
//! the SHA-256 digest of each chain it accepted (its DER as the peer sent it) with that
//! window; a chain that differs in any byte has another digest and is verified in full
//! (passing as an accepted chain would take a SHA-256 second preimage). The peer still
//! proves it holds the key in every handshake (its CertificateVerify signature is not
//! cached), and a rotated secret builds a new context, with an empty cache. Refused chains
//! are never kept.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use boring::asn1::{Asn1Time, Asn1TimeRef};
use boring::sha::Sha256;
use boring::stack::StackRef;
use boring::x509::{X509, X509StoreContextRef};

/// Chains kept per context: a sidecar's inbound sees one per client workload instance.
/// At 64 bytes a chain (digest and window) a full cache takes about 100 KiB.
pub const CAPACITY: usize = 1024;

/// SHA-256 of a chain's DER.
pub type Digest = [u8; 32];

/// When a verified chain may be accepted again: every certificate in it is valid then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Window {
    fn holds(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

#[derive(Default)]
struct Chains {
    windows: HashMap<Digest, Window>,
    /// Insertion order, oldest first: the oldest chain leaves when the cache is full.
    order: VecDeque<Digest>,
    hits: u64,
}

/// The accepted chains of one context, keyed by the digest of the chain as the peer sent it.
pub struct VerifiedChains {
    capacity: usize,
    chains: Mutex<Chains>,
}

impl VerifiedChains {
    pub fn new(capacity: usize) -> Self {
        VerifiedChains { capacity, chains: Mutex::default() }
    }

    /// Whether `chain` was accepted before and `now` is inside its window.
    pub fn accepts(&self, chain: &Digest, now: SystemTime) -> bool {
        let mut c = self.chains.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = c.windows.get(chain).is_some_and(|w| w.holds(now));
        c.hits += u64::from(hit);
        hit
    }

    pub fn insert(&self, chain: Digest, window: Window) {
        if self.capacity == 0 {
            return;
        }
        let mut c = self.chains.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = c.windows.get_mut(&chain) {
            *w = window;
            return;
        }
        while c.order.len() >= self.capacity {
            let Some(oldest) = c.order.pop_front() else { break };
            c.windows.remove(&oldest);
        }
        c.order.push_back(chain);
        c.windows.insert(chain, window);
    }

    pub fn chains(&self) -> usize {
        self.chains.lock().unwrap_or_else(PoisonError::into_inner).windows.len()
    }

    /// Handshakes that skipped verification.
    pub fn hits(&self) -> u64 {
        self.chains.lock().unwrap_or_else(PoisonError::into_inner).hits
    }

    /// BoringSSL's certificate verification step for a context (`SSL_CTX_set_cert_verify_callback`):
    /// a chain accepted before and still in its window passes; any other goes through
    /// `X509_verify_cert` (which calls the context's verify callback with its SAN and trust
    /// domain rules) and, when accepted, is kept.
    pub fn verify(&self, ctx: &mut X509StoreContextRef) -> bool {
        let Some(key) = presented(ctx) else {
            return ctx.verify_cert().unwrap_or(false);
        };
        if self.accepts(&key, SystemTime::now()) {
            ctx.set_error(Ok(()));
            return true;
        }
        let accepted = ctx.verify_cert().unwrap_or(false) && ctx.verify_result().is_ok();
        if accepted && let Some(window) = ctx.chain().and_then(window_of) {
            self.insert(key, window);
        }
        accepted
    }
}

/// The digest of the chain as the peer sent it (leaf first): of its certificates' DER,
/// concatenated. DER is self-delimiting, so two different chains never give the same bytes.
fn presented(ctx: &X509StoreContextRef) -> Option<Digest> {
    let mut h = Sha256::new();
    match ctx.untrusted().filter(|s| !s.is_empty()) {
        Some(chain) => {
            for c in chain {
                h.update(&c.to_der().ok()?);
            }
        }
        None => h.update(&ctx.cert()?.to_der().ok()?),
    }
    Some(h.finish())
}

/// The time in which every certificate of a verified chain (trust anchor included) is valid.
fn window_of(chain: &StackRef<X509>) -> Option<Window> {
    // Certificate times are ASN.1 times: each is placed relative to one "now", read once in
    // both clocks.
    let (now, base) = (Asn1Time::days_from_now(0).ok()?, SystemTime::now());
    let at = |t: &Asn1TimeRef| -> Option<SystemTime> {
        let d = now.diff(t).ok()?;
        let secs = i64::from(d.days) * 86_400 + i64::from(d.secs);
        if secs >= 0 {
            base.checked_add(Duration::from_secs(secs.unsigned_abs()))
        } else {
            base.checked_sub(Duration::from_secs(secs.unsigned_abs()))
        }
    };
    let mut w: Option<Window> = None;
    for c in chain {
        let (nb, na) = (at(c.not_before())?, at(c.not_after())?);
        w = Some(match w {
            None => Window { not_before: nb, not_after: na },
            Some(w) => Window { not_before: w.not_before.max(nb), not_after: w.not_after.min(na) },
        });
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(chain: &[u8]) -> Digest {
        boring::sha::sha256(chain)
    }

    fn window(from: u64, to: u64) -> Window {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        Window { not_before: t(from), not_after: t(to) }
    }

    #[test]
    fn a_chain_passes_again_only_byte_for_byte_and_inside_its_window() {
        let v = VerifiedChains::new(4);
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert!(!v.accepts(&d(b"chain-a"), at(150)), "nothing is accepted before it was verified");
        v.insert(d(b"chain-a"), window(100, 200));
        assert!(v.accepts(&d(b"chain-a"), at(100)));
        assert!(v.accepts(&d(b"chain-a"), at(200)));
        assert!(!v.accepts(&d(b"chain-a"), at(99)), "not yet valid");
        assert!(!v.accepts(&d(b"chain-a"), at(201)), "expired");
        assert!(!v.accepts(&d(b"chain-b"), at(150)), "another chain");
        assert!(!v.accepts(&d(b"chain-a-longer"), at(150)), "a chain with more bytes");
        assert!(!v.accepts(&d(b"chain-"), at(150)), "a prefix");
        assert_eq!(v.hits(), 2);
    }

    #[test]
    fn a_full_cache_lets_its_oldest_chain_go() {
        let v = VerifiedChains::new(2);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(150);
        for c in [&b"a"[..], b"b", b"a", b"c"] {
            v.insert(d(c), window(100, 200));
        }
        assert_eq!(v.chains(), 2);
        assert!(!v.accepts(&d(b"a"), now), "the oldest went when c came");
        assert!(v.accepts(&d(b"b"), now) && v.accepts(&d(b"c"), now));
        let none = VerifiedChains::new(0);
        none.insert(d(b"a"), window(100, 200));
        assert!(!none.accepts(&d(b"a"), now));
    }

    /// Real contexts: a sidecar inbound requiring mesh client certificates with a SPIFFE
    /// prefix, and an outbound checking the server's exact SPIFFE ID.
    mod handshakes {
        use super::super::super::{ClientTls, Secrets, ServerTls, client, server};
        use crate::stats::SslStats;
        use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SubjectAltNameMatcher,
            TlsCertificate, TlsParameters, UpstreamTlsContext, common_tls_context::ValidationContextType,
            subject_alt_name_matcher::SanType, tls_parameters::TlsProtocol,
        };
        use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};

        struct Ca {
            pem: String,
            issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        }

        fn ca(name: &str) -> Ca {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let pem = p.self_signed(&key).unwrap().pem();
            Ca { pem, issuer: rcgen::Issuer::new(p, key) }
        }

        fn text(s: &str) -> Option<DataSource> {
            Some(DataSource { specifier: Some(data_source::Specifier::InlineString(s.into())), ..Default::default() })
        }

        /// A leaf with one SPIFFE ID, issued by `ca`, as a `TlsCertificate`.
        fn leaf(ca: &Ca, spiffe: &str) -> TlsCertificate {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into().unwrap())];
            let cert = p.signed_by(&key, &ca.issuer).unwrap();
            TlsCertificate {
                certificate_chain: text(&cert.pem()),
                private_key: text(&key.serialize_pem()),
                ..Default::default()
            }
        }

        fn common(ca: &Ca, me: TlsCertificate, peer: MatchPattern) -> CommonTlsContext {
            CommonTlsContext {
                tls_certificates: vec![me],
                validation_context_type: Some(ValidationContextType::ValidationContext(CertificateValidationContext {
                    trusted_ca: text(&ca.pem),
                    match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                        san_type: SanType::Uri as i32,
                        matcher: Some(StringMatcher { match_pattern: Some(peer), ..Default::default() }),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
                ..Default::default()
            }
        }

        /// The `backend` inbound: mesh client certificates with a SPIFFE prefix, required
        /// or not.
        fn inbound(mesh: &Ca, require: bool) -> ServerTls {
            let ctx = DownstreamTlsContext {
                common_tls_context: Some(common(
                    mesh,
                    leaf(mesh, "spiffe://default/backend"),
                    MatchPattern::Prefix("spiffe://default/".into()),
                )),
                require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue { value: require }),
                ..Default::default()
            };
            server(&ctx, &Secrets::new()).unwrap()
        }

        /// An outbound that never resumes, so that every handshake verifies the server.
        fn outbound(mesh: &Ca, me: TlsCertificate) -> ClientTls {
            let ctx = UpstreamTlsContext {
                sni: "backend{mesh=default}".into(),
                common_tls_context: Some(common(mesh, me, MatchPattern::Exact("spiffe://default/backend".into()))),
                max_session_keys: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 0 }),
                ..Default::default()
            };
            client(&ctx, &Secrets::new()).unwrap()
        }

        /// A handshake counted in `inbound` (the server's listener stats) and a throwaway
        /// client side.
        async fn counted(srv: &ServerTls, c: &ClientTls, inbound: &SslStats) -> Result<(), String> {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let client_side = SslStats::default();
            let (accepted, connected) = tokio::join!(srv.accept(a, inbound), c.connect(b, &client_side));
            accepted.and(connected).map(drop)
        }

        async fn handshake(srv: &ServerTls, c: &ClientTls) -> Result<(), String> {
            counted(srv, c, &SslStats::default()).await
        }

        #[tokio::test]
        async fn a_peer_chain_is_verified_once_and_a_refused_one_every_time() {
            let (mesh, other) = (ca("mesh CA"), ca("another CA"));
            let srv = inbound(&mesh, true);
            let inbound = srv.verified.clone().unwrap();
            let web = outbound(&mesh, leaf(&mesh, "spiffe://default/web"));
            for _ in 0..3 {
                handshake(&srv, &web).await.unwrap();
            }
            assert_eq!((inbound.chains(), inbound.hits()), (1, 2), "the second and third handshakes skip the check");
            assert_eq!((web.verified.chains(), web.verified.hits()), (1, 2), "so does the outbound, for the server");

            // Refused chains are refused every time, and never kept: another CA's
            // certificate, and the mesh CA's for another mesh (the SAN rule refuses it).
            let forged = outbound(&mesh, leaf(&other, "spiffe://default/web"));
            let other_mesh = outbound(&mesh, leaf(&mesh, "spiffe://other/web"));
            for c in [&forged, &other_mesh, &forged, &other_mesh] {
                assert!(handshake(&srv, c).await.is_err());
            }
            assert_eq!((inbound.chains(), inbound.hits()), (1, 2));
            // The accepted chain still passes.
            handshake(&srv, &web).await.unwrap();
            assert_eq!(inbound.hits(), 3);

            // Envoy's `ssl.*` stats tell the refusals apart: the CA's, the SAN rule's, and a
            // client without a certificate.
            let stats = SslStats::default();
            let anonymous = client(
                &UpstreamTlsContext {
                    common_tls_context: Some(CommonTlsContext {
                        validation_context_type: common(
                            &mesh,
                            leaf(&mesh, "spiffe://default/x"),
                            MatchPattern::Prefix(String::new()),
                        )
                        .validation_context_type,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                &Secrets::new(),
            )
            .unwrap();
            for c in [&web, &forged, &other_mesh, &other_mesh, &anonymous, &web] {
                let _ = counted(&srv, c, &stats).await;
            }
            let got = |c: &crate::stats::Counter| c.get();
            assert_eq!(
                [&stats.handshake, &stats.fail_verify_error, &stats.fail_verify_san, &stats.fail_verify_no_cert]
                    .map(got),
                [2, 1, 2, 1]
            );
            assert_eq!([&stats.connection_error, &stats.no_certificate, &stats.session_reused].map(got), [0, 0, 0]);
        }

        /// TLS over real sockets, where a read that would block waits for the socket
        /// without calling into BoringSSL (tls::stream): records small and large, in both
        /// directions at once, arrive whole and in order, then the end of stream.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn relays_small_and_large_records_over_sockets_to_the_end() {
            use crate::tls::prefixed::Prefixed;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mesh = ca("mesh CA");
            let srv = inbound(&mesh, false);
            let web = outbound(&mesh, leaf(&mesh, "spiffe://default/web"));
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (accepted, connected) = tokio::join!(l.accept(), tokio::net::TcpStream::connect(addr));
            let stats = SslStats::default();
            let (s, c) = tokio::join!(
                srv.accept(Prefixed::new(bytes::Bytes::new(), accepted.unwrap().0), &stats),
                web.connect(crate::upstream::Stream::Tcp(connected.unwrap()), &stats)
            );
            let (s, c) = (s.unwrap(), c.unwrap());
            // Sizes from one byte to several records, written as one piece each.
            let sizes: Vec<usize> = (0..40).map(|i| [1, 64, 4095, 4096, 16 * 1024 + 7, 70_000][i % 6]).collect();
            let total: usize = sizes.iter().sum();
            fn pattern(i: usize) -> u8 {
                (i % 251) as u8
            }
            async fn send<W: tokio::io::AsyncWrite + Unpin>(mut w: W, sizes: Vec<usize>) {
                let mut at = 0;
                for n in sizes {
                    let chunk: Vec<u8> = (at..at + n).map(pattern).collect();
                    w.write_all(&chunk).await.unwrap();
                    at += n;
                }
                w.shutdown().await.unwrap();
            }
            async fn receive<R: tokio::io::AsyncRead + Unpin>(mut r: R) -> Vec<u8> {
                let mut got = vec![];
                r.read_to_end(&mut got).await.unwrap();
                got
            }
            let (sr, sw) = tokio::io::split(s);
            let (cr, cw) = tokio::io::split(c);
            // Bounded: a read that waited for the socket when BoringSSL had bytes would hang.
            let all = async { tokio::join!(send(cw, sizes.clone()), send(sw, sizes), receive(sr), receive(cr)) };
            let (_, _, at_server, at_client) =
                tokio::time::timeout(std::time::Duration::from_secs(60), all).await.expect("the relay stalled");
            for got in [at_server, at_client] {
                assert_eq!(got.len(), total);
                assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));
            }
        }

        #[tokio::test]
        async fn resumed_sessions_are_counted_on_both_sides() {
            let mesh = ca("mesh CA");
            let srv = inbound(&mesh, true);
            // Kuma's outbound: `max_session_keys` unset, Envoy's default of one session;
            // TLS 1.2 at most (Envoy's client default), or 1.3 when `tls_params` say so.
            for max in [TlsProtocol::TlSv12, TlsProtocol::TlSv13] {
                let mut common_ctx = common(
                    &mesh,
                    leaf(&mesh, "spiffe://default/web"),
                    MatchPattern::Exact("spiffe://default/backend".into()),
                );
                common_ctx.tls_params =
                    Some(TlsParameters { tls_maximum_protocol_version: max as i32, ..Default::default() });
                let ctx = UpstreamTlsContext {
                    sni: "backend{mesh=default}".into(),
                    common_tls_context: Some(common_ctx),
                    ..Default::default()
                };
                let web = client(&ctx, &Secrets::new()).unwrap();
                let (inbound, outbound) = (SslStats::default(), SslStats::default());
                for _ in 0..3 {
                    let (a, b) = tokio::io::duplex(64 * 1024);
                    let (accepted, connected) = tokio::join!(srv.accept(a, &inbound), web.connect(b, &outbound));
                    let (mut s, mut c) = (accepted.unwrap(), connected.unwrap());
                    // A TLS 1.3 ticket arrives after the handshake: one byte each way reads it.
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut one = [0u8; 1];
                    c.write_all(b"x").await.unwrap();
                    s.read_exact(&mut one).await.unwrap();
                    s.write_all(b"y").await.unwrap();
                    c.read_exact(&mut one).await.unwrap();
                }
                for side in [&inbound, &outbound] {
                    assert_eq!((side.handshake.get(), side.session_reused.get()), (3, 2), "{max:?}");
                }
            }
        }
    }
}
