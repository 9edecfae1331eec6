//! A Listener as `dp` holds it between receiving it and building the snapshot: decoded,
//! except for its filter chains, which stay protobuf-encoded until the build turns them into
//! routing state one at a time.
//!
//! Why: a zone ingress has one chain per service and tag set, 100,000 at the file-load
//! bench's scale, and envoy-types' structs keep every nested message inline (608 bytes per
//! `FilterChain`, 1,275 per `Filter`, whose oneof holds a whole `ExtensionConfigSource`).
//! Decoded all at once they were 188 MiB at the peak of a load; encoded they are about a
//! tenth of that, and each decoded chain lives only while it is built.

use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener};
use prost::Message;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};
use std::ops::Deref;

/// `Listener.filter_chains`' field number.
const FILTER_CHAINS: u32 = 3;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListenerResource {
    /// Every field but `filter_chains`, which is empty here.
    head: Listener,
    /// The chains' encodings, end to end.
    chains: Vec<u8>,
    /// Where each chain's encoding ends in `chains`.
    ends: Vec<usize>,
}

impl Deref for ListenerResource {
    type Target = Listener;

    /// The listener without its chains (see [`ListenerResource::chains`]).
    fn deref(&self) -> &Listener {
        &self.head
    }
}

impl From<Listener> for ListenerResource {
    fn from(mut head: Listener) -> Self {
        let (mut chains, mut ends) = (vec![], vec![]);
        for fc in std::mem::take(&mut head.filter_chains) {
            fc.encode(&mut chains).expect("a Vec grows as needed");
            ends.push(chains.len());
        }
        ListenerResource { head, chains, ends }
    }
}

impl ListenerResource {
    /// Decodes an encoded Listener, leaving its chains encoded. Whatever the split does not
    /// expect (a group, a chain that is not length-delimited, a truncated field) is left to
    /// prost, whose error then names the problem.
    pub fn decode(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        match Self::split(bytes) {
            Some((head, chains, ends)) => {
                Ok(ListenerResource { head: Listener::decode(head.as_slice())?, chains, ends })
            }
            None => Listener::decode(bytes).map(Self::from),
        }
    }

    /// The top-level fields other than the chains, and the chains' payloads.
    fn split(bytes: &[u8]) -> Option<(Vec<u8>, Vec<u8>, Vec<usize>)> {
        let (mut head, mut chains, mut ends) = (Vec::with_capacity(256), Vec::with_capacity(bytes.len()), vec![]);
        let mut rest = bytes;
        while !rest.is_empty() {
            let field = rest;
            let (tag, wire_type) = decode_key(&mut rest).ok()?;
            let skip = match wire_type {
                WireType::Varint => decode_varint(&mut rest).ok().map(|_| 0)?,
                WireType::SixtyFourBit => 8,
                WireType::ThirtyTwoBit => 4,
                WireType::LengthDelimited => usize::try_from(decode_varint(&mut rest).ok()?).ok()?,
                WireType::StartGroup | WireType::EndGroup => return None,
            };
            let payload = rest.get(..skip)?;
            rest = &rest[skip..];
            if tag == FILTER_CHAINS {
                if wire_type != WireType::LengthDelimited {
                    return None;
                }
                chains.extend_from_slice(payload);
                ends.push(chains.len());
            } else {
                head.extend_from_slice(&field[..field.len() - rest.len()]);
            }
        }
        chains.shrink_to_fit();
        Some((head, chains, ends))
    }

    pub fn chain_count(&self) -> usize {
        self.ends.len()
    }

    /// The filter chains, each decoded when the iterator reaches it.
    pub fn chains(&self) -> impl Iterator<Item = Result<FilterChain, prost::DecodeError>> + '_ {
        self.encoded_chains().map(FilterChain::decode)
    }

    /// Each chain's encoding.
    fn encoded_chains(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(start, &end)| &self.chains[start..end])
    }

    /// The whole Listener, chains decoded: for the small listeners read as a whole (DNS,
    /// dynamic config) and for tests.
    pub fn to_listener(&self) -> Result<Listener, prost::DecodeError> {
        let mut l = self.head.clone();
        l.filter_chains = self.chains().collect::<Result<_, _>>()?;
        Ok(l)
    }

    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head.encoded_len() + self.chains.len() + 4 * self.ends.len());
        self.head.encode(&mut out).expect("a Vec grows as needed");
        for chain in self.encoded_chains() {
            encode_key(FILTER_CHAINS, WireType::LengthDelimited, &mut out);
            encode_varint(chain.len() as u64, &mut out);
            out.extend_from_slice(chain);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChainMatch};

    fn listener(names: &[&str]) -> Listener {
        Listener {
            name: "ingress".into(),
            filter_chains: names
                .iter()
                .map(|n| FilterChain {
                    filter_chain_match: Some(FilterChainMatch {
                        server_names: vec![n.to_string()],
                        ..Default::default()
                    }),
                    filters: vec![Filter { name: format!("f-{n}"), ..Default::default() }],
                    ..Default::default()
                })
                .collect(),
            stat_prefix: "after the chains in field order".into(),
            ..Default::default()
        }
    }

    #[test]
    fn chains_stay_encoded_and_decode_to_what_was_sent() {
        let l = listener(&["a.mesh", "b.mesh", "c.mesh"]);
        let r = ListenerResource::decode(&l.encode_to_vec()).unwrap();
        assert_eq!(r.filter_chains, vec![], "the head holds no chains");
        assert_eq!((r.name.as_str(), r.stat_prefix.as_str()), ("ingress", "after the chains in field order"));
        assert_eq!(r.chain_count(), 3);
        let chains: Vec<_> = r.chains().collect::<Result<_, _>>().unwrap();
        assert_eq!(chains, l.filter_chains);
        assert_eq!(r.to_listener().unwrap(), l);
        assert_eq!(Listener::decode(r.encode_to_vec().as_slice()).unwrap(), l);
        assert_eq!(ListenerResource::from(l.clone()), r);
    }

    #[test]
    fn a_listener_without_chains_and_a_broken_one() {
        let l = listener(&[]);
        let r = ListenerResource::decode(&l.encode_to_vec()).unwrap();
        assert_eq!((r.chain_count(), r.to_listener().unwrap()), (0, l));
        let mut cut = listener(&["a.mesh"]).encode_to_vec();
        cut.truncate(cut.len() - 3);
        assert!(ListenerResource::decode(&cut).is_err(), "a truncated listener is refused");
        // A chain sent as a varint is not a chain: prost's error, not a silent drop.
        let mut bad = vec![];
        encode_key(FILTER_CHAINS, WireType::Varint, &mut bad);
        encode_varint(7, &mut bad);
        assert!(ListenerResource::decode(&bad).is_err());
    }
}
