//! Counters of the KDS streams, per peer (zone name, or `global` on a zone), resource
//! type and event; served in the Prometheus text format at `/metrics` on the REST port.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    /// Responses sent (each carries changed resources and removals of one type).
    ResponsesSent,
    /// Resources sent inside those responses.
    ResourcesSent,
    ResponsesAcked,
    ResponsesNacked,
    /// Resources received and applied.
    ResourcesReceived,
    /// Resources received and refused (named in a NACK).
    ResourcesRejected,
}

impl Event {
    fn metric(self) -> &'static str {
        match self {
            Event::ResponsesSent => "kds_responses_sent_total",
            Event::ResourcesSent => "kds_resources_sent_total",
            Event::ResponsesAcked => "kds_responses_acked_total",
            Event::ResponsesNacked => "kds_responses_nacked_total",
            Event::ResourcesReceived => "kds_resources_received_total",
            Event::ResourcesRejected => "kds_resources_rejected_total",
        }
    }
}

#[derive(Default)]
pub struct KdsMetrics {
    counters: Mutex<BTreeMap<(Event, String, String), u64>>,
}

impl KdsMetrics {
    pub fn add(&self, event: Event, peer: &str, rtype: &str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut c) = self.counters.lock() {
            *c.entry((event, peer.to_string(), rtype.to_string())).or_default() += n;
        }
    }

    pub fn get(&self, event: Event, peer: &str, rtype: &str) -> u64 {
        self.counters
            .lock()
            .ok()
            .and_then(|c| c.get(&(event, peer.to_string(), rtype.to_string())).copied())
            .unwrap_or(0)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(c) = self.counters.lock() else { return out };
        let mut last = None;
        for ((event, peer, rtype), v) in c.iter() {
            if last != Some(*event) {
                let _ = writeln!(out, "# TYPE {} counter", event.metric());
                last = Some(*event);
            }
            let _ = writeln!(out, "{}{{peer=\"{peer}\",type=\"{rtype}\"}} {v}", event.metric());
        }
        out
    }
}
