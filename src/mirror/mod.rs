//! What the admission path and `sync` ask of mirrors: whether a mirror holds an image, and
//! copies of the images it lacks.
//!
//! [`CopyRequest`] is the one copy request type (a Pod's missing image, a `sync` entry), and
//! [`CopyRequest::for_rewrite`] the one place that decides between a copy and a pull-through
//! warm-up. [`service`] holds the cached, single-flight checks and the copy queue.

mod cadence;
pub mod checks;
pub mod circuit;
pub mod queue;
pub mod run;
pub mod service;

use std::future::Future;
use std::pin::Pin;

use crate::mapping::{Platform, Rewrite};
use crate::reference::Reference;

/// Whether the mirror holds an image, as far as the webhook could tell in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Present,
    Absent,
    /// No answer in time, or an answer that proves nothing (401, 5xx, garbage).
    Unknown,
}

/// What the upstream registry said a tag's digest is, as far as the webhook could tell in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    Digest(String),
    /// The registry answered that it has no such tag.
    Absent,
    /// No answer in time, or one that proves nothing.
    Unknown,
}

/// Where a copy handed to a [`CopyRunner`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Started now: its end is reported through a [`CopyEnds`].
    Started,
    /// Started earlier (by this replica or another) and still running.
    Running,
    /// Done already (an earlier request's Job).
    Succeeded,
    /// Failed already, and kept until it expires.
    Failed,
}

/// Why a runner could not take a copy (the copy then runs in-process).
pub type RunnerError = Box<dyn std::error::Error + Send + Sync>;

/// A copy being handed to a [`CopyRunner`].
pub type Submission<'a> = Pin<Box<dyn Future<Output = Result<Submitted, RunnerError>> + Send + 'a>>;

/// Runs copies outside the webhook (Kubernetes Jobs, `copies.runner: job`).
pub trait CopyRunner: Send + Sync {
    fn submit<'a>(
        &'a self,
        copy: &'a CopyRequest,
        settings: &'a crate::settings::Settings,
    ) -> Submission<'a>;
}

/// How a copy run elsewhere ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEnd {
    Succeeded,
    Failed,
    /// Gone before it finished (deleted by someone).
    Vanished,
}

/// Told of the end of copies run elsewhere, by (source, target) as the runner recorded them.
pub trait CopyEnds: Send + Sync {
    fn ended(&self, source: &str, target: &str, end: CopyEnd);
}

/// How a missing image gets into its mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Push a copy into a registry we write to.
    Copy,
    /// A pull-through cache fills itself: one manifest fetch through it is enough.
    WarmUp,
}

/// A copy of `source` to `target`, asked for by a Pod whose mirror lacked it or by `sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRequest {
    pub source: Reference,
    pub target: Reference,
    /// Platforms to copy; empty means all.
    pub platforms: Vec<Platform>,
    /// Whether signatures, attestations, SBOMs and OCI referrers come along.
    pub referrers: bool,
    pub mode: CopyMode,
}

/// `copy`'s exit status when trying again cannot help (`run::MirrorError::permanent`); a copy
/// Job's `podFailurePolicy` fails the Job on it instead of spending every try.
pub const COPY_PERMANENT_FAILURE: u8 = 3;

impl CopyRequest {
    /// The copy that fills the mirror of `rewrite`: a warm-up for a pull-through cache, a copy
    /// of the selected platforms otherwise.
    pub fn for_rewrite(rewrite: &Rewrite<'_>) -> CopyRequest {
        let pull_through = rewrite.mirror.is_some_and(|m| m.is_pull_through());
        CopyRequest {
            source: rewrite.source.clone(),
            target: rewrite.target.clone(),
            platforms: rewrite.policy.platforms.to_vec(),
            referrers: rewrite.policy.referrers,
            mode: if pull_through {
                CopyMode::WarmUp
            } else {
                CopyMode::Copy
            },
        }
    }
}

/// How a copy or warm-up ended, for the image records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOutcome {
    pub attempts: u32,
    /// `in-process`, or the copy Job's name.
    pub runner: String,
    pub warm_up: bool,
    /// The digest copied (upstream's, now the mirror's); `None` after a failure, or when a
    /// Job's end told none.
    pub digest: Option<String>,
    /// The error, in one line and without credentials; `None` after a success.
    pub error: Option<String>,
    /// Whether no further try follows (a failure that gave up).
    pub gave_up: bool,
}

/// The cluster's record of the images sent to mirrors (`MirroredImage` objects): told what
/// this replica learns, and asked what other replicas learnt. Every method returns at once
/// (an implementation queues), so that nothing here ever waits on the Kubernetes API.
pub trait ImageRecords: Send + Sync {
    /// An admission sent a Pod to `target` (`copying`: kept unchanged while its copy runs).
    fn used(&self, source: &str, target: &str, copying: bool);
    /// A check of the mirror answered (`digest` when it was found).
    fn checked(&self, target: &str, presence: Presence, digest: Option<&str>);
    /// A copy or warm-up started, through `runner` (`in-process` or a Job's name).
    fn copy_started(&self, source: &str, target: &str, runner: &str);
    /// A copy or warm-up ended.
    fn copy_ended(&self, source: &str, target: &str, outcome: &CopyOutcome);
    /// Whether a replica found `target` on its mirror less than `ttl` ago.
    fn known_present(&self, target: &str, ttl: std::time::Duration) -> bool;
    /// Whether another replica holds a copy of `source` → `target` that is still going on.
    fn copied_elsewhere(&self, source: &str, target: &str) -> bool;
}

/// Asks mirrors whether they hold an image, and takes copy requests.
pub trait MirrorAccess: Send + Sync {
    /// Whether `target` is in its mirror; answers from a cache when it can.
    fn presence<'a>(
        &'a self,
        target: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Presence> + Send + 'a>>;
    /// Queues a background copy (de-duplicated by the implementation); whether it was queued
    /// now (not already queued, running or handed to a Job).
    fn request_copy(&self, copy: CopyRequest) -> bool;
    /// An admission sent a Pod to `target`, or kept it while its copy runs (`copying`); for
    /// the image records, when there are any.
    fn record_use(&self, source: &str, target: &str, copying: bool) {
        let _ = (source, target, copying);
    }
    /// The digest `source`'s tag has upstream (for `pin: digest`), from a cache when it can.
    /// An implementation that cannot ask registries says it does not know.
    fn upstream_digest<'a>(
        &'a self,
        source: &'a Reference,
    ) -> Pin<Box<dyn Future<Output = Upstream> + Send + 'a>> {
        let _ = source;
        Box::pin(std::future::ready(Upstream::Unknown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Decision;

    #[test]
    fn a_pull_through_mirror_is_warmed_up_a_repository_mirror_copied_into() {
        let table = crate::config::Config::parse(
            "t.yaml",
            r#"
mirrors:
  m: {type: repository, registry: mirror.local, prefix: p, platforms: [linux/arm64]}
  ecr: {type: pull-through, registry: 1.dkr.ecr.eu-west-1.amazonaws.com, upstreams: {quay.io: quay}}
rules:
  - {match: ["docker.io/library/*"], mirror: m}
  - {match: ["quay.io/**"], mirror: ecr}
"#,
        )
        .map(|c| c.table)
        .unwrap();
        let request = |image: &str| match table.decide(image) {
            Decision::Rewrite(rw) => CopyRequest::for_rewrite(&rw),
            Decision::Keep(k) => panic!("{image}: {:?}", k.reason),
        };
        let hub = request("nginx:1.27");
        assert_eq!(hub.mode, CopyMode::Copy);
        assert_eq!(hub.target.as_str(), "mirror.local/p/nginx:1.27");
        assert_eq!(hub.platforms, [Platform::parse("linux/arm64").unwrap()]);
        let quay = request("quay.io/minio/minio:1");
        assert_eq!(quay.mode, CopyMode::WarmUp);
        assert_eq!(
            quay.target.as_str(),
            "1.dkr.ecr.eu-west-1.amazonaws.com/quay/minio/minio:1"
        );
    }
}
