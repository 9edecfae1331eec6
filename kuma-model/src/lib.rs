//! Kuma's formats that both `dp` and `cp` read: Go durations, resource names, token
//! shape, dataplane templates and proxy resources, and the vocabulary of `dp` <-> `cp`
//! (proxy types, feature strings, the bootstrap request). No I/O and few dependencies,
//! so every parser here has a fast fuzz target.

pub mod duration;
pub mod proxy;
pub mod resource;
pub mod template;
pub mod token;
