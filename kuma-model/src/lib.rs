//! Kuma's user-facing formats that both `dp` and `cp` read: Go durations, resource
//! names, token shape, dataplane templates and proxy resources. No I/O and few
//! dependencies, so every parser here has a fast fuzz target.

pub mod duration;
pub mod resource;
pub mod template;
pub mod token;
