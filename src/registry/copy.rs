//! One whole-image copy: the index, every selected platform manifest, every blob the target
//! lacks, manifests byte for byte so that every digest stays; then the tag.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE};
use serde::Deserialize;

use super::failure::{Failure, ImageError, RegistryError};
use super::stream::{read_ahead, rechunk};
use super::{to_oci, CopyReport, HostClient, Progress, Registries, TagLeft, MANIFEST_TYPES};
use crate::locks::lock;
use crate::mapping::Platform;
use crate::reference::{wire_host, Reference};
use crate::settings::UploadMode;

/// oci-client sends each stream item as its own PATCH; collect items into pieces this big.
const UPLOAD_PIECE: usize = 4 * 1024 * 1024;
/// Upload pieces fetched while the previous one is being sent (memory: pieces × 4 MiB per blob).
const READ_AHEAD: usize = 1;
/// Pieces of a streamed (monolithic) upload, and how many are fetched ahead of it.
const STREAM_PIECE: usize = 1024 * 1024;
const STREAM_AHEAD: usize = 4;
/// Blobs of one image copied at the same time.
const BLOB_CONCURRENCY: usize = 4;

/// One copy in progress.
pub(super) struct CopyJob<'r> {
    pub(super) registries: &'r Registries,
    pub(super) src: Arc<HostClient>,
    pub(super) dst: Arc<HostClient>,
    pub(super) source: Reference,
    pub(super) target: Reference,
    pub(super) bytes: Arc<AtomicU64>,
    pub(super) progress: Option<Progress>,
    pub(super) report: Mutex<CopyReport>,
    pub(super) blobs_seen: Mutex<BTreeSet<String>>,
    /// The bytes of every blob the image has (as its manifests say), each once.
    pub(super) image_size: AtomicU64,
    /// Whether signatures and referrers travel with the image.
    pub(super) referrers: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<DescriptorPlatform>,
    #[serde(default)]
    urls: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct DescriptorPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl DescriptorPlatform {
    fn label(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{}", self.os, self.architecture, v),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
}

impl ManifestDoc {
    fn parse(bytes: &[u8], what: &str) -> Result<Self, RegistryError> {
        let doc: ManifestDoc = serde_json::from_slice(bytes)
            .map_err(|e| RegistryError::image(what, ImageError::NotJson(e)))?;
        if doc.schema_version == Some(1) {
            return Err(RegistryError::image(what, ImageError::SchemaV1));
        }
        Ok(doc)
    }

    fn is_index(&self) -> bool {
        self.manifests.is_some()
    }

    /// The type to push it with: its own `mediaType`, else what its shape says (OCI makes the
    /// field optional).
    fn content_type(&self) -> &str {
        match (&self.media_type, self.is_index()) {
            (Some(t), _) if !t.is_empty() => t,
            (_, true) => OCI_IMAGE_INDEX_MEDIA_TYPE,
            (_, false) => OCI_IMAGE_MEDIA_TYPE,
        }
    }
}

/// A child manifest to push: where, its bytes, its type, and what it says.
type Fetched = (Reference, Bytes, String, ManifestDoc);

type BoxedCopy<'a> = Pin<Box<dyn Future<Output = Result<(), RegistryError>> + Send + 'a>>;

impl CopyJob<'_> {
    pub(super) async fn run(&self, platforms: &[Platform]) -> Result<CopyReport, RegistryError> {
        let src_oci = to_oci(&self.source);
        // Blob and push calls take no credentials: oci-client uses those stored per registry.
        self.src
            .client
            .store_auth_if_needed(src_oci.resolve_registry(), &self.src.auth)
            .await;
        self.dst
            .client
            .store_auth_if_needed(wire_host(self.target.registry()), &self.dst.auth)
            .await;
        let name = self.source.to_string();
        // HEAD first: Docker Hub counts manifest GETs, not HEADs.
        let digest = match self.source.digest() {
            Some(d) => d.to_string(),
            None => {
                self.registries
                    .retry(&self.src, "inspect", &name, || {
                        self.src
                            .client
                            .fetch_manifest_digest(&src_oci, &self.src.auth)
                    })
                    .await?
            }
        };
        // The tag the target gets, if any: never one upstream's tag does not point at now.
        let tag = self.tag_to_push(&digest).await?;
        // The target already holds this exact top manifest (under the tag it gets, else by
        // digest): nothing to move.
        if platforms.is_empty() {
            let probe = match tag {
                Some(tag) => self.at_tag(&self.target, tag)?,
                None => self.at_digest(&self.target, &digest),
            };
            if self.target_has(&probe).await?.as_deref() == Some(digest.as_str()) {
                // A signature may have come since the image did.
                if self.referrers {
                    self.copy_referrers(std::slice::from_ref(&digest)).await?;
                }
                let mut report = self.take_report();
                report.digest = digest;
                report.manifests_skipped += 1;
                report.bytes += self.bytes.load(Ordering::Relaxed);
                return Ok(report);
            }
        }
        let pinned = self.at_digest(&self.source, &digest);
        let (raw, got) = self.pull_manifest(&pinned).await?;
        let doc = ManifestDoc::parse(&raw, &name)?;
        let mut top_digest = got;
        let mut body = raw;
        // Digests whose signatures and referrers follow: the top manifest unless it is rebuilt
        // (nobody upstream can have signed a new digest), and the children copied. They are
        // looked for while the image is copied, and copied once it is in.
        let find = |subjects: Vec<String>| async move {
            match self.referrers {
                true => self.find_referrers(&subjects).await.map(Some),
                false => Ok(None),
            }
        };
        let found;
        if let Some(children) = &doc.manifests {
            let selected: Vec<&Descriptor> = children
                .iter()
                .filter(|c| platforms.is_empty() || selects(platforms, c))
                .collect();
            if selected.is_empty() {
                let wanted: Vec<String> = platforms.iter().map(Platform::to_string).collect();
                return Err(RegistryError::image(
                    name,
                    ImageError::NoPlatformMatch(wanted.join(", ")),
                ));
            }
            let filtered = selected.len() < children.len();
            if filtered && self.target.digest().is_some() {
                // A rebuilt index has another digest, which a pinned target could never have.
                return Err(RegistryError::image(
                    &self.target,
                    ImageError::PinnedNeedsAllPlatforms,
                ));
            }
            let mut subjects: Vec<String> = selected.iter().map(|c| c.digest.clone()).collect();
            if !filtered {
                subjects.insert(0, top_digest.clone());
            }
            found = futures::try_join!(self.copy_manifests(&selected, 1), find(subjects))?.1;
            for child in &selected {
                if let Some(p) = &child.platform {
                    self.report().platforms.push(p.label());
                }
            }
            if filtered {
                body = filter_index(&body, &selected)
                    .map_err(|e| RegistryError::image(&name, ImageError::NotJson(e)))?;
                top_digest = sha256_digest(&body);
                self.report().filtered = true;
            }
        } else {
            let subjects = vec![top_digest.clone()];
            found = futures::try_join!(self.copy_blobs(std::iter::once(&doc)), find(subjects))?.1;
        }
        let content_type = doc.content_type().to_string();
        // By digest first, then the tag, so a tag+digest reference finds both.
        let by_digest = self.at_digest(&self.target, &top_digest);
        self.push_manifest(&by_digest, &body, &content_type).await?;
        if let Some(tag) = tag {
            let by_tag = self.at_tag(&self.target, tag)?;
            self.push_manifest(&by_tag, &body, &content_type).await?;
        }
        if let Some(found) = found {
            self.bring_referrers(found).await?;
        }
        let mut report = self.take_report();
        report.digest = top_digest;
        report.manifests_copied += 1;
        report.bytes += self.bytes.load(Ordering::Relaxed);
        Ok(report)
    }

    /// The target's tag, when pushing it cannot move the mirror's tag backwards: always when
    /// the source was read by its tag just now, else only when upstream's tag points at
    /// `digest` now (a Pod's `app:1.0@sha256:<old>` must not make every `app:1.0` on the mirror
    /// the old build). A tag left alone is said in the report, with why.
    async fn tag_to_push(&self, digest: &str) -> Result<Option<&str>, RegistryError> {
        let Some(tag) = self.target.tag() else {
            return Ok(None);
        };
        if self.source.digest().is_none() {
            return Ok(Some(tag));
        }
        let why = match self.source.tag() {
            None => format!(
                "the source {} names no tag, so nothing shows that upstream serves this digest \
                 as {tag}",
                self.source
            ),
            Some(upstream_tag) => {
                let at = self.at_tag(&self.source, upstream_tag)?;
                match self.source_has(&at).await? {
                    Some(now) if now == digest => return Ok(Some(tag)),
                    Some(now) => format!("upstream's {upstream_tag} is now {now}, not {digest}"),
                    None => format!("upstream has no tag {upstream_tag} now"),
                }
            }
        };
        self.report().tag_left = Some(TagLeft {
            tag: tag.to_string(),
            why,
        });
        Ok(None)
    }

    pub(super) fn report(&self) -> std::sync::MutexGuard<'_, CopyReport> {
        lock(&self.report)
    }

    fn take_report(&self) -> CopyReport {
        std::mem::take(&mut *self.report())
    }

    pub(super) fn at_digest(&self, r: &Reference, digest: &str) -> Reference {
        Reference::from_parts(r.registry(), r.path(), None, Some(digest))
            .unwrap_or_else(|_| r.clone())
    }

    pub(super) fn at_tag(&self, r: &Reference, tag: &str) -> Result<Reference, RegistryError> {
        Reference::from_parts(r.registry(), r.path(), Some(tag), None)
            .map_err(|e| RegistryError::image(r, ImageError::Reference(e)))
    }

    /// The digest the target has at `r`; `None` when it has nothing there. Any other failure
    /// stops the copy: pushing blind into a registry that does not answer helps nobody.
    pub(super) async fn target_has(&self, r: &Reference) -> Result<Option<String>, RegistryError> {
        Self::digest_at(self.registries, &self.dst, r).await
    }

    /// The digest the source has at `r`; `None` when it has nothing there.
    pub(super) async fn source_has(&self, r: &Reference) -> Result<Option<String>, RegistryError> {
        Self::digest_at(self.registries, &self.src, r).await
    }

    async fn digest_at(
        registries: &Registries,
        host: &HostClient,
        r: &Reference,
    ) -> Result<Option<String>, RegistryError> {
        let oci = to_oci(r);
        let name = r.to_string();
        let found = registries
            .retry(host, "inspect", &name, || {
                host.client.fetch_manifest_digest(&oci, &host.auth)
            })
            .await;
        match found {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.failure() == Some(Failure::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn pull_manifest(
        &self,
        r: &Reference,
    ) -> Result<(Bytes, String), RegistryError> {
        Self::pull_from(self.registries, &self.src, r).await
    }

    /// A manifest the target has, as it has it.
    pub(super) async fn pull_target_manifest(&self, r: &Reference) -> Result<Bytes, RegistryError> {
        Ok(Self::pull_from(self.registries, &self.dst, r).await?.0)
    }

    async fn pull_from(
        registries: &Registries,
        host: &HostClient,
        r: &Reference,
    ) -> Result<(Bytes, String), RegistryError> {
        let oci = to_oci(r);
        let name = r.to_string();
        registries
            .retry(host, "fetch manifest", &name, || {
                host.client
                    .pull_manifest_raw(&oci, &host.auth, &MANIFEST_TYPES)
            })
            .await
    }

    pub(super) async fn push_manifest(
        &self,
        r: &Reference,
        body: &Bytes,
        content_type: &str,
    ) -> Result<(), RegistryError> {
        // When a registry answers a push without `Location` (ECR does), oci-client strips the
        // tag off the URL and panics if it is not there; a push by digest has no tag. Giving it
        // the digest as its "tag" makes that suffix match. The URL uses the digest either way.
        let oci = match r.digest() {
            Some(d) => oci_client::Reference::with_tag_and_digest(
                r.registry().to_string(),
                r.path().to_string(),
                d.to_string(),
                d.to_string(),
            ),
            None => to_oci(r),
        };
        let name = r.to_string();
        let header = reqwest::header::HeaderValue::from_str(content_type).map_err(|_| {
            RegistryError::image(&name, ImageError::MediaType(content_type.to_string()))
        })?;
        self.registries
            .retry(&self.dst, "push manifest", &name, || {
                self.dst
                    .client
                    .push_manifest_raw(&oci, body.clone(), header.clone())
            })
            .await?;
        Ok(())
    }

    /// Copies the child manifests of an index: the blobs of all of them at once (several
    /// platforms' layers move together, each shared one once), then the manifests, since a
    /// registry accepts a manifest only once all it references is there. A nested index's
    /// children go first, the same way.
    fn copy_manifests<'a>(&'a self, children: &'a [&'a Descriptor], depth: usize) -> BoxedCopy<'a> {
        Box::pin(async move {
            // Each child looked up in the target and fetched from the source, several at once.
            let fetched: Vec<Option<Fetched>> = futures::stream::iter(children)
                .map(|desc| self.fetch_child(desc, depth))
                .boxed()
                .buffered(BLOB_CONCURRENCY)
                .try_collect()
                .await?;
            let (indexes, images): (Vec<Fetched>, Vec<Fetched>) = fetched
                .into_iter()
                .flatten()
                .partition(|(_, _, _, doc)| doc.is_index());
            for (at_target, raw, content_type, doc) in &indexes {
                let grandchildren: Vec<&Descriptor> = doc.manifests.iter().flatten().collect();
                self.copy_manifests(&grandchildren, depth + 1).await?;
                self.push_manifest(at_target, raw, content_type).await?;
                self.report().manifests_copied += 1;
            }
            self.copy_blobs(images.iter().map(|(_, _, _, doc)| doc))
                .await?;
            // Their blobs are all in: the manifests can go at once.
            futures::future::try_join_all(images.iter().map(
                |(at_target, raw, content_type, _)| async move {
                    self.push_manifest(at_target, raw, content_type).await?;
                    self.report().manifests_copied += 1;
                    Ok::<_, RegistryError>(())
                },
            ))
            .await?;
            Ok(())
        })
    }

    /// A child manifest the target lacks, fetched from the source; `None` when the target
    /// has it.
    async fn fetch_child(
        &self,
        desc: &Descriptor,
        depth: usize,
    ) -> Result<Option<Fetched>, RegistryError> {
        let at_target = self.at_digest(&self.target, &desc.digest);
        if self.target_has(&at_target).await?.is_some() {
            self.report().manifests_skipped += 1;
            return Ok(None);
        }
        let at_source = self.at_digest(&self.source, &desc.digest);
        let (raw, _) = self.pull_manifest(&at_source).await?;
        let doc = ManifestDoc::parse(&raw, &at_source.to_string())?;
        if doc.is_index() && depth >= 3 {
            return Err(RegistryError::image(&at_source, ImageError::NestedTooDeep));
        }
        let content_type = if desc.media_type.is_empty() {
            doc.content_type().to_string()
        } else {
            desc.media_type.clone()
        };
        Ok(Some((at_target, raw, content_type, doc)))
    }

    /// Config and layers of image manifests, a few at a time, each blob once.
    async fn copy_blobs<'d>(
        &self,
        docs: impl Iterator<Item = &'d ManifestDoc>,
    ) -> Result<(), RegistryError> {
        let mut blobs = docs
            .flat_map(|doc| doc.config.iter().chain(&doc.layers).chain(&doc.blobs))
            // Foreign (non-distributable) layers live at their URLs, not in the registry.
            .filter(|d| d.urls.is_empty() || !is_foreign(&d.media_type))
            .filter(|d| lock(&self.blobs_seen).insert(d.digest.clone()))
            .collect::<Vec<_>>();
        // Checked before the first byte moves: a Pod author must not be able to push any image
        // at all into the mirror (and through the pull budget).
        let adding: u64 = blobs.iter().map(|d| d.size).sum();
        let size = self.image_size.fetch_add(adding, Ordering::Relaxed) + adding;
        if let Some(max) = self.registries.settings().copies.max_image_size {
            if size > max {
                return Err(RegistryError::image(
                    &self.source,
                    ImageError::TooLarge { size, max },
                ));
            }
        }
        // Largest first: the longest transfer starts at once, small ones fill in beside it.
        blobs.sort_by_key(|d| std::cmp::Reverse(d.size));
        futures::stream::iter(blobs)
            .map(|d| self.copy_blob(d))
            // Boxing works around rust-lang/rust#104382 (a Send future over a borrowing map).
            .boxed()
            .buffer_unordered(BLOB_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn copy_blob(&self, desc: &Descriptor) -> Result<(), RegistryError> {
        let src_oci = to_oci(&self.source);
        let dst_oci = to_oci(&self.target);
        let name = format!("{}@{}", self.target.name(), desc.digest);
        let exists = self
            .registries
            .retry(&self.dst, "check blob", &name, || {
                self.dst.client.blob_exists(&dst_oci, &desc.digest)
            })
            .await?;
        if exists {
            self.report().blobs_skipped += 1;
            return Ok(());
        }
        let layer = oci_client::manifest::OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size as i64,
            ..Default::default()
        };
        self.registries
            .retry_transfer(&self.dst, "copy blob", &name, || {
                let layer = layer.clone();
                let src_oci = src_oci.clone();
                let dst_oci = dst_oci.clone();
                async move {
                    let pulled = self.src.client.pull_blob_stream(&src_oci, &layer).await?;
                    // Bytes are counted as they arrive; a retried blob counts again, as it moved
                    // again.
                    let counter = self.bytes.clone();
                    let progress = self.progress.clone();
                    let stream = pulled.stream.map(move |piece| {
                        let piece = piece.map_err(OciDistributionError::from)?;
                        counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
                        if let Some(p) = &progress {
                            p(piece.len() as u64);
                        }
                        Ok(piece)
                    });
                    // Pieces fetched ahead, so that the download goes on while the upload sends:
                    // a few small ones for one streamed PUT, one whole PATCH piece for chunks.
                    let stream: Pin<Box<dyn Stream<Item = _> + Send>> =
                        if self.dst.access.upload() == UploadMode::Monolithic {
                            Box::pin(read_ahead(rechunk(stream, STREAM_PIECE), STREAM_AHEAD))
                        } else {
                            Box::pin(read_ahead(rechunk(stream, UPLOAD_PIECE), READ_AHEAD))
                        };
                    self.dst
                        .client
                        .push_blob_stream(&dst_oci, stream, &layer.digest, Some(desc.size))
                        .await
                }
            })
            .await?;
        self.report().blobs_copied += 1;
        Ok(())
    }
}

/// Foreign (Windows base) and non-distributable layers: registries serve them from their URLs
/// and often refuse to store them, so copies leave them where they are (as skopeo does).
fn is_foreign(media_type: &str) -> bool {
    media_type.contains(".foreign.") || media_type.contains(".nondistributable.")
}

/// Whether an index entry is one of the selected platforms.
fn selects(platforms: &[Platform], desc: &Descriptor) -> bool {
    let Some(p) = &desc.platform else {
        return false;
    };
    platforms.iter().any(|want| {
        want.os == p.os
            && want.architecture == p.architecture
            && (want.variant.is_none() || want.variant == p.variant)
    })
}

/// The index with only the selected entries; every other field kept as it was.
fn filter_index(raw: &[u8], keep: &[&Descriptor]) -> Result<Bytes, serde_json::Error> {
    let mut doc: serde_json::Value = serde_json::from_slice(raw)?;
    if let Some(list) = doc.get_mut("manifests").and_then(|m| m.as_array_mut()) {
        list.retain(|m| {
            m.get("digest")
                .and_then(|d| d.as_str())
                .is_some_and(|d| keep.iter().any(|k| k.digest == d))
        });
    }
    serde_json::to_vec(&doc).map(Bytes::from)
}

fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_layers_are_recognised() {
        assert!(is_foreign(
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        ));
        assert!(is_foreign(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        ));
        assert!(!is_foreign("application/vnd.oci.image.layer.v1.tar+gzip"));
        assert!(!is_foreign(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
    }

    #[test]
    fn platform_filter_keeps_other_fields() {
        let raw = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"digest":"sha256:a","platform":{"os":"linux","architecture":"amd64"}},{"digest":"sha256:b","platform":{"os":"linux","architecture":"arm64","variant":"v8"}}],"annotations":{"k":"v"}}"#;
        let doc = ManifestDoc::parse(raw, "x").unwrap();
        let children = doc.manifests.as_ref().unwrap();
        let arm = [Platform::parse("linux/arm64").unwrap()];
        let keep: Vec<&Descriptor> = children.iter().filter(|c| selects(&arm, c)).collect();
        assert_eq!(keep.len(), 1);
        let out: serde_json::Value =
            serde_json::from_slice(&filter_index(raw, &keep).unwrap()).unwrap();
        assert_eq!(out["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(out["manifests"][0]["digest"], "sha256:b");
        assert_eq!(out["annotations"]["k"], "v");
        let v9 = [Platform::parse("linux/arm64/v9").unwrap()];
        assert!(children.iter().all(|c| !selects(&v9, c)));
    }
}
