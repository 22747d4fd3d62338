//! Declared images: a `MirroredImage` a person created (no `recorded-by` label) asks for its
//! image to be on the mirror. Each is copied (or warmed up) through the same queue, pull
//! budget and runner as a Pod's missing image, again after a failure, and again every
//! `spec.refresh` so that a moved tag is copied anew (as `sync --refresh` does).

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::crd::{MirroredImage, Phase, RECORDED_BY_LABEL};
use super::{age, canonical, Shared, HOLD_TIMEOUT};
use crate::locks::lock;
use crate::mapping::{Decision, Platform, Table};
use crate::mirror::{CopyRequest, MirrorAccess};
use crate::reference::Reference;
use crate::settings::parse_duration;

/// How often declared images are looked at.
const PASS: Duration = Duration::from_secs(5);
/// How long after a failed copy a declared image is tried again.
const AFTER_FAILURE: Duration = Duration::from_secs(300);

/// Looks at every declared image each [`PASS`]; ends with the records.
pub(super) async fn run(shared: Weak<Shared>, mirrors: Arc<dyn MirrorAccess>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let declared: Vec<Arc<MirroredImage>> = lock(&strong.known)
            .objects
            .values()
            .filter(|o| {
                o.metadata
                    .labels
                    .as_ref()
                    .is_none_or(|l| !l.contains_key(RECORDED_BY_LABEL))
            })
            .cloned()
            .collect();
        let table = strong.config.current().table.clone();
        for object in declared {
            let Some(copy) = request_for(&object, &table) else {
                continue;
            };
            if !due(&object, &strong.holder) {
                continue;
            }
            // Known by its own name: the records write to this object, not to a new one.
            if let Some(name) = &object.metadata.name {
                let pair = (
                    canonical(copy.source.as_str()),
                    canonical(copy.target.as_str()),
                );
                let mut known = lock(&strong.known);
                known.by_pair.insert(pair.clone(), name.clone());
                let names = known.by_target.entry(pair.1).or_default();
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
            if mirrors.request_copy(copy.clone()) {
                tracing::info!(name = object.metadata.name.as_deref().unwrap_or(""),
                    source = %copy.source, target = %copy.target, "declared image queued");
            }
        }
        drop(strong);
        tokio::time::sleep(PASS).await;
    }
}

/// The copy a declared image asks for: to `spec.target`, or where the table sends its source;
/// `None` (said once in the log per pass) when neither gives a target.
fn request_for(object: &MirroredImage, table: &Table) -> Option<CopyRequest> {
    let spec = &object.spec;
    let name = object.metadata.name.as_deref().unwrap_or("");
    let source = match Reference::parse(&spec.source) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(name, error = %e, "declared image: spec.source is not a reference");
            return None;
        }
    };
    let decided = match table.decide(source.as_str()) {
        Decision::Rewrite(r) => Some(CopyRequest::for_rewrite(&r)),
        Decision::Keep(_) => None,
    };
    let mut copy = match (&spec.target, decided) {
        (Some(target), decided) => {
            let target = Reference::parse(target).ok()?;
            let mut copy = decided.unwrap_or(CopyRequest {
                source: source.clone(),
                target: target.clone(),
                platforms: Vec::new(),
                referrers: true,
                mode: crate::mirror::CopyMode::Copy,
            });
            copy.target = target;
            copy
        }
        (None, Some(copy)) => copy,
        (None, None) => {
            tracing::debug!(name, source = %source, "declared image: the table sends it nowhere; give spec.target");
            return None;
        }
    };
    if !spec.platforms.is_empty() {
        copy.platforms = spec
            .platforms
            .iter()
            .filter_map(|p| Platform::parse(p).ok())
            .collect();
    }
    Some(copy)
}

/// Whether a declared image needs a copy now: never tried, missing, failed a while ago, or
/// last copied longer ago than its `refresh`; not while a replica holds its copy.
fn due(object: &MirroredImage, holder: &str) -> bool {
    let Some(status) = &object.status else {
        return true;
    };
    if let Some(c) = &status.copying {
        if c.holder != holder && age(&c.since).is_some_and(|a| a < HOLD_TIMEOUT) {
            return false;
        }
    }
    let since_copy = status.last_copy.as_ref().and_then(|c| age(&c.time));
    match status.phase {
        None | Some(Phase::Missing) | Some(Phase::Unknown) => true,
        // The queue holds it (in this replica, or the holder's).
        Some(Phase::Copying) => status.copying.is_none() && since_copy.is_none(),
        Some(Phase::Failed) => since_copy.is_none_or(|a| a > AFTER_FAILURE),
        Some(Phase::Present) | Some(Phase::WarmedUp) => {
            let refresh = object
                .spec
                .refresh
                .as_deref()
                .and_then(|r| parse_duration(r).ok());
            match refresh {
                Some(every) => {
                    let last = since_copy.or_else(|| status.last_checked.as_deref().and_then(age));
                    last.is_none_or(|a| a > every)
                }
                None => false,
            }
        }
    }
}
