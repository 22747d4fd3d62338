//! image-mirror-webhook: a Kubernetes mutating admission webhook that rewrites container images
//! to a mirror.
//!
//! The pure core ([`reference`], [`mapping`], [`patch`]) does no I/O; [`admission`] turns a
//! review into a response; [`server`], [`tls`], [`metrics`] and [`config`] are the shell around
//! them.

pub mod admission;
pub mod certs;
pub mod cli;
pub mod config;
pub mod mapping;
pub mod metrics;
pub mod mirror;
pub mod patch;
pub mod pod_view;
pub mod reference;
pub mod registry;
pub mod server;
pub mod sync;
pub mod tls;
pub mod watch;

pub use mapping::{Decision, Table};
pub use reference::Reference;
pub use server::router;
