//! What the integration tests share: real registries on loopback ([`registry`]), reviews,
//! fixtures and a webhook to send them to ([`webhook`]), and a real API server ([`envtest`]).
#![allow(dead_code)]

pub mod envtest;
pub mod header_proxy;
pub mod registry;
pub mod webhook;

#[allow(unused_imports)]
pub use header_proxy::RateLimitProxy;
#[allow(unused_imports)]
pub use registry::*;
#[allow(unused_imports)]
pub use webhook::*;

pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
