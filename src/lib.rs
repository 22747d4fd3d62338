//! image-mirror-webhook: a Kubernetes mutating admission webhook that rewrites container images
//! to a mirror.
//!
//! The pure core does no I/O: [`reference`] (the grammar), [`mapping`] (the table and
//! `decide`), [`settings`] and [`problems`] (the rest of the table file), [`pod`] (reading the
//! review's Pod) and [`patch`] (writing the JSON Patch); [`admission`]'s core turns a review
//! into a response. Around it: [`mirror`] and [`registry`] (checks and copies), [`cluster`]
//! (the Kubernetes API: pull secrets, copy Jobs), [`server`] (what answers requests), [`app`]
//! (`serve` assembled),
//! [`tls`], [`config`], [`watch`], [`metrics`], [`logs`], [`certs`] and the [`cli`].

pub mod admission;
pub mod app;
pub mod aws;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod error;
pub mod export;
mod locks;
pub mod logs;
pub mod mapping;
pub mod metrics;
pub mod mirror;
pub mod patch;
pub mod pod;
pub mod problems;
pub mod reference;
pub mod registry;
pub mod server;
pub mod settings;
pub mod tls;
pub mod watch;

pub use mapping::{Decision, Table};
pub use reference::Reference;
pub use server::router;
