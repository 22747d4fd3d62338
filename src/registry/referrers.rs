//! What points at a copied image travels with it: cosign's signature, attestation and SBOM tags
//! (`sha256-<hex>.sig`, `.att`, `.sbom`), and OCI 1.1 referrers, read through the referrers API
//! where the source has it, else through the referrers tag schema (`sha256-<hex>`). Each is
//! copied byte for byte, so digests and signatures still verify. A target without the referrers
//! API (GHCR, distribution 2.8) gets the tag schema: an index of the referrers under
//! `sha256-<hex>`, merged with one it already has.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE;
use serde_json::Value;

use super::copy::CopyJob;
use super::failure::{ImageError, RegistryError};
use super::{CopyReport, HostClient};
use crate::reference::Reference;

/// cosign's tags for a digest `sha256:<hex>`: `sha256-<hex>` and one of these.
const COSIGN_SUFFIXES: [&str; 3] = [".sig", ".att", ".sbom"];

type BoxedReport<'a> = Pin<Box<dyn Future<Output = Result<CopyReport, RegistryError>> + Send + 'a>>;

/// The referrers of a digest, as the source lists them.
struct Listing {
    /// The descriptors, as JSON, so that `artifactType` and annotations survive.
    manifests: Vec<Value>,
    /// The tag-schema index itself, when that is where they came from.
    tag_index: Option<Bytes>,
}

/// What points at one subject, found in the source (and what of it the target lacks).
pub(super) struct Found {
    schema_tag: String,
    /// cosign tags the source has: (source, target).
    cosign: Vec<(Reference, Reference)>,
    listing: Option<Listing>,
    /// Listed referrers the target lacks: (source, target).
    missing: Vec<(Reference, Reference)>,
}

/// Subjects looked at, and cosign tags asked about, at once.
const LOOKUPS_AT_ONCE: usize = 4;

impl CopyJob<'_> {
    /// Copies what points at each of `subjects` (digests the target now has).
    pub(super) async fn copy_referrers(&self, subjects: &[String]) -> Result<(), RegistryError> {
        let found = self.find_referrers(subjects).await?;
        self.bring_referrers(found).await
    }

    /// Looks for what points at each of `subjects`, reading only: so it can run while the
    /// image itself is copied. Every lookup is a `HEAD` or a referrers listing, several at once.
    pub(super) async fn find_referrers(
        &self,
        subjects: &[String],
    ) -> Result<Vec<Found>, RegistryError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(subjects)
            .map(|digest| self.find_referrers_of(digest))
            .boxed()
            .buffered(LOOKUPS_AT_ONCE)
            .try_collect()
            .await
    }

    async fn find_referrers_of(&self, digest: &str) -> Result<Found, RegistryError> {
        let schema_tag = digest.replace(':', "-");
        let tag_base = schema_tag.as_str();
        let cosign = async {
            let mut found = Vec::new();
            let lookups = COSIGN_SUFFIXES.map(|suffix| async move {
                let tag = format!("{tag_base}{suffix}");
                let from = self.at_tag(&self.source, &tag)?;
                let has = self.source_has(&from).await?.is_some();
                Ok::<_, RegistryError>(match has {
                    true => Some((from, self.at_tag(&self.target, &tag)?)),
                    false => None,
                })
            });
            for pair in futures::future::try_join_all(lookups).await? {
                found.extend(pair);
            }
            Ok::<_, RegistryError>(found)
        };
        let listing = self.list_referrers(digest, &schema_tag);
        let (cosign, listing) = futures::try_join!(cosign, listing)?;
        let mut missing = Vec::new();
        for m in listing.iter().flat_map(|l| &l.manifests) {
            let Some(d) = m.get("digest").and_then(Value::as_str) else {
                continue;
            };
            let to = self.at_digest(&self.target, d);
            if self.target_has(&to).await?.is_none() {
                missing.push((self.at_digest(&self.source, d), to));
            }
        }
        Ok(Found {
            schema_tag,
            cosign,
            listing,
            missing,
        })
    }

    /// Copies what [`find_referrers`](Self::find_referrers) found, once the subjects are in
    /// the target; a target without the referrers API gets the tag-schema indexes.
    pub(super) async fn bring_referrers(&self, found: Vec<Found>) -> Result<(), RegistryError> {
        let mut target_api = None;
        for f in found {
            for (from, to) in f.cosign.into_iter().chain(f.missing) {
                self.copy_artifact(from, to).await?;
            }
            let Some(listing) = &f.listing else {
                continue;
            };
            let api = match target_api {
                Some(api) => api,
                None => {
                    let subject = f.schema_tag.replacen('-', ":", 1);
                    let api = self
                        .referrers_api(&self.dst, &self.target, &subject)
                        .await
                        .is_some();
                    target_api = Some(api);
                    api
                }
            };
            if !api {
                self.write_tag_index(&f.schema_tag, listing).await?;
            }
        }
        Ok(())
    }

    /// One artifact (a signature, an attestation, a referrer) copied whole, without referrers
    /// of its own; what it moved counts in this copy's report.
    fn copy_artifact<'s>(&'s self, from: Reference, to: Reference) -> BoxedReport<'s> {
        Box::pin(async move {
            let nested = self
                .registries
                .copy_with(&from, &to, &[], self.progress.clone(), false)
                .await?;
            let mut report = self.report();
            report.referrers += usize::from(nested.manifests_copied > 0);
            report.blobs_copied += nested.blobs_copied;
            report.blobs_skipped += nested.blobs_skipped;
            report.bytes += nested.bytes;
            Ok(nested)
        })
    }

    /// The source's referrers of `digest`: the API, else the tag schema; `None` when there
    /// are none.
    async fn list_referrers(
        &self,
        digest: &str,
        schema_tag: &str,
    ) -> Result<Option<Listing>, RegistryError> {
        if let Some(index) = self.referrers_api(&self.src, &self.source, digest).await {
            let manifests = manifests_of(&index);
            return Ok((!manifests.is_empty()).then_some(Listing {
                manifests,
                tag_index: None,
            }));
        }
        let at = self.at_tag(&self.source, schema_tag)?;
        if self.source_has(&at).await?.is_none() {
            return Ok(None);
        }
        let (raw, _) = self.pull_manifest(&at).await?;
        let index: Value = serde_json::from_slice(&raw)
            .map_err(|e| RegistryError::image(&at, ImageError::NotJson(e)))?;
        let manifests = manifests_of(&index);
        Ok((!manifests.is_empty()).then_some(Listing {
            manifests,
            tag_index: Some(raw),
        }))
    }

    /// `GET /v2/<name>/referrers/<digest>`: the index when the registry has the API, `None`
    /// when it answers anything else (a 404 is what a registry without the API says).
    async fn referrers_api(
        &self,
        host: &HostClient,
        on: &Reference,
        digest: &str,
    ) -> Option<Value> {
        let (url, image) = host.api_url(on, &format!("referrers/{digest}"));
        let request = host
            .probe
            .get(url)
            .header(reqwest::header::ACCEPT, OCI_IMAGE_INDEX_MEDIA_TYPE);
        let response = host.authorized(request, &image).await.send().await.ok()?;
        if response.status() != reqwest::StatusCode::OK {
            return None;
        }
        response.json::<Value>().await.ok()
    }

    /// Keeps the target's tag-schema index of `schema_tag` listing every referrer copied:
    /// the source's own index byte for byte when the target has none, else the target's with
    /// the missing entries added.
    async fn write_tag_index(
        &self,
        schema_tag: &str,
        listing: &Listing,
    ) -> Result<(), RegistryError> {
        let at = self.at_tag(&self.target, schema_tag)?;
        let existing = match self.target_has(&at).await? {
            Some(_) => Some(self.pull_target_manifest(&at).await?),
            None => None,
        };
        let body = match (existing, &listing.tag_index) {
            (None, Some(raw)) => raw.clone(),
            (existing, _) => {
                let mut index: Value = match &existing {
                    Some(raw) => serde_json::from_slice(raw)
                        .map_err(|e| RegistryError::image(&at, ImageError::NotJson(e)))?,
                    None => serde_json::json!({
                        "schemaVersion": 2,
                        "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
                        "manifests": [],
                    }),
                };
                let have: Vec<String> = manifests_of(&index)
                    .iter()
                    .filter_map(|m| m.get("digest").and_then(Value::as_str).map(str::to_string))
                    .collect();
                let missing: Vec<Value> = listing
                    .manifests
                    .iter()
                    .filter(|m| {
                        m.get("digest")
                            .and_then(Value::as_str)
                            .is_some_and(|d| !have.iter().any(|h| h == d))
                    })
                    .cloned()
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
                if let Some(list) = index.get_mut("manifests").and_then(Value::as_array_mut) {
                    list.extend(missing);
                }
                Bytes::from(
                    serde_json::to_vec(&index)
                        .map_err(|e| RegistryError::image(&at, ImageError::NotJson(e)))?,
                )
            }
        };
        self.push_manifest(&at, &body, OCI_IMAGE_INDEX_MEDIA_TYPE)
            .await
    }
}

fn manifests_of(index: &Value) -> Vec<Value> {
    index
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}
