//! The Pod of a review, read once into the few fields the webhook uses, with the accessors
//! every other module reads it through.
//!
//! The reader keeps only what admission and the patch need: names, the opt-out label, the
//! original-images record, the image slots and the pull secrets' names. Everything else
//! (`managedFields`, probes, env, status: most of the bytes) is scanned and never allocated.
//! Nothing here assumes the Pod is well formed: a member of an unexpected type reads as
//! *odd*, a list item that is not an object is passed over, and every accessor answers `None`
//! or nothing for a shape it does not expect. What is kept is bounded whatever a caller sends
//! ([`MAX_IMAGES`], [`MAX_PULL_SECRETS`], [`MAX_TEXT`]), so that a forged review cannot make
//! the webhook allocate more than a small multiple of its body.

/// The label (on Pods and namespaces) that opts a workload out (`disabled`) or a namespace in.
pub const INJECT_LABEL: &str = "image-mirror/inject";

/// The annotation recording each container's original image (JSON: container name → image).
pub const ORIGINAL_IMAGES_ANNOTATION: &str = "image-mirror/original-images";

/// Image slots read from one list of a Pod; a Pod with more is left unchanged (no real Pod
/// comes near: every container is a process on one node).
pub const MAX_IMAGES: usize = 2048;

/// Pull secrets read from a Pod; past it the Pod is left unchanged.
pub const MAX_PULL_SECRETS: usize = 256;

/// The longest string kept as it came. No name or image reference is this long (a reference is
/// at most a 255-character host, a 255-character path, a 128-character tag and a digest); a
/// longer one is kept cut to [`CUT_TO`] characters and `…`, which no reference parses as.
pub const MAX_TEXT: usize = 1024;

/// What a string past [`MAX_TEXT`] is cut to.
const CUT_TO: usize = 128;

/// Where in a Pod spec an image is named: the three container lists, and image volumes
/// (`spec.volumes[].image.reference`, which the kubelet pulls like a container image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageSite {
    Containers,
    InitContainers,
    EphemeralContainers,
    Volumes,
}

impl ImageSite {
    const ALL: [ImageSite; 4] = [
        ImageSite::Containers,
        ImageSite::InitContainers,
        ImageSite::EphemeralContainers,
        ImageSite::Volumes,
    ];

    /// The field name in `spec`.
    pub fn field(self) -> &'static str {
        match self {
            ImageSite::Containers => "containers",
            ImageSite::InitContainers => "initContainers",
            ImageSite::EphemeralContainers => "ephemeralContainers",
            ImageSite::Volumes => "volumes",
        }
    }

    /// The path of the image under one item of the list.
    pub fn image_path(self) -> &'static [&'static str] {
        match self {
            ImageSite::Volumes => &["image", "reference"],
            _ => &["image"],
        }
    }

    /// The `kind` label of the rewrite metrics.
    pub fn label(self) -> &'static str {
        match self {
            ImageSite::Containers => "container",
            ImageSite::InitContainers => "init-container",
            ImageSite::EphemeralContainers => "ephemeral-container",
            ImageSite::Volumes => "image-volume",
        }
    }

    /// How warnings name one item: `container "web"`, `volume "models"`.
    pub fn noun(self) -> &'static str {
        match self {
            ImageSite::Volumes => "volume",
            _ => "container",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// A well-formed image: an object in one of the lists, with a string image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef<'a> {
    pub site: ImageSite,
    pub index: usize,
    /// The container's or volume's name; `containers[2]`-style when the Pod gave none.
    pub name: String,
    pub image: &'a str,
}

impl ImageRef<'_> {
    /// Its key in the original-images record: the container's name, `volumes/NAME` for an
    /// image volume (volume and container names may be the same).
    pub fn record_key(&self) -> String {
        match self.site {
            ImageSite::Volumes => format!("volumes/{}", self.name),
            _ => self.name.clone(),
        }
    }
}

/// A JSON member as it came: absent, `null`, the expected type (read), or another type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Member<T> {
    #[default]
    Absent,
    Null,
    Read(T),
    Odd,
}

impl<T> Member<T> {
    pub fn read(&self) -> Option<&T> {
        match self {
            Member::Read(t) => Some(t),
            _ => None,
        }
    }
}

/// A Pod as a review carries it, read into what the webhook uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pod {
    metadata: Member<Metadata>,
    spec: Member<Spec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Metadata {
    name: Option<String>,
    generate_name: Option<String>,
    namespace: Option<String>,
    /// `labels["image-mirror/inject"]`.
    inject: Option<String>,
    annotations: Member<Annotations>,
}

/// What the webhook reads of `metadata.annotations`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Annotations {
    /// The original-images record, when it is a string.
    pub original_images: Option<String>,
    /// Whether the map has any key (the record's included).
    pub any: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Spec {
    /// The image slots of each [`ImageSite`], by `ImageSite::slot`.
    images: [Slots; 4],
    pull_secrets: Member<PullSecrets>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Slots {
    items: Vec<Slot>,
    /// More than [`MAX_IMAGES`] items: the rest were not read.
    overflow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    index: usize,
    name: Option<String>,
    image: String,
}

/// What the webhook reads of `spec.imagePullSecrets`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PullSecrets {
    /// The names of the entries that name a secret.
    pub names: Vec<String>,
    /// How many entries the list has, well formed or not.
    pub entries: usize,
    /// More than [`MAX_PULL_SECRETS`] entries: not every name was read.
    pub overflow: bool,
}

impl Pod {
    /// A Pod from JSON already in memory (tests, benches), read like a review's.
    pub fn from_value(v: &serde_json::Value) -> Option<Pod> {
        pruned(v).ok().flatten()
    }

    fn meta(&self) -> Option<&Metadata> {
        self.metadata.read()
    }

    /// `metadata` as it came (the annotation patch needs to know).
    pub fn metadata_shape(&self) -> Member<()> {
        shape(&self.metadata)
    }

    pub fn name(&self) -> Option<&str> {
        self.meta()?.name.as_deref()
    }

    /// Pods of a Deployment have only this until the API server names them.
    pub fn generate_name(&self) -> Option<&str> {
        self.meta()?.generate_name.as_deref()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.meta()?.namespace.as_deref()
    }

    /// Whether the Pod opts out with `image-mirror/inject: disabled`.
    pub fn opted_out(&self) -> bool {
        self.meta().and_then(|m| m.inject.as_deref()) == Some("disabled")
    }

    /// `metadata.annotations` as it came: missing, `null`, a map, or something odd.
    pub fn annotations(&self) -> Member<&Annotations> {
        match self.meta() {
            Some(m) => match &m.annotations {
                Member::Read(a) => Member::Read(a),
                Member::Absent => Member::Absent,
                Member::Null => Member::Null,
                Member::Odd => Member::Odd,
            },
            None => Member::Absent,
        }
    }

    /// The original-images record an earlier invocation left.
    pub fn original_images(&self) -> Option<&str> {
        self.annotations().read()?.original_images.as_deref()
    }

    fn spec(&self) -> Option<&Spec> {
        self.spec.read()
    }

    /// `spec.imagePullSecrets` as it came: missing, `null`, a list, or something odd.
    pub fn pull_secret_list(&self) -> Member<&PullSecrets> {
        match self.spec() {
            Some(s) => match &s.pull_secrets {
                Member::Read(p) => Member::Read(p),
                Member::Absent => Member::Absent,
                Member::Null => Member::Null,
                Member::Odd => Member::Odd,
            },
            None => Member::Absent,
        }
    }

    /// The secret names the Pod already lists in `spec.imagePullSecrets`.
    pub fn pull_secrets(&self) -> Vec<&str> {
        self.pull_secret_list()
            .read()
            .map(|p| p.names.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Whether the Pod holds more images or pull secrets than the reader keeps: it is left
    /// unchanged, since what was not read cannot be patched right.
    pub fn too_large(&self) -> bool {
        self.spec().is_some_and(|s| {
            s.images.iter().any(|l| l.overflow) || s.pull_secrets.read().is_some_and(|p| p.overflow)
        })
    }

    /// The well-formed images of `sites`, site by site in the order given; anything malformed
    /// (and any volume that is not an image volume) is passed over.
    pub fn images(&self, sites: &[ImageSite]) -> Vec<ImageRef<'_>> {
        let Some(spec) = self.spec() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &site in sites {
            for slot in &spec.images[site.slot()].items {
                let name = match &slot.name {
                    Some(n) => n.clone(),
                    None => format!("{}[{}]", site.field(), slot.index),
                };
                out.push(ImageRef {
                    site,
                    index: slot.index,
                    name,
                    image: &slot.image,
                });
            }
        }
        out
    }
}

fn shape<T>(m: &Member<T>) -> Member<()> {
    match m {
        Member::Absent => Member::Absent,
        Member::Null => Member::Null,
        Member::Read(_) => Member::Read(()),
        Member::Odd => Member::Odd,
    }
}

mod read;

pub use read::{pruned, short_text};

#[cfg(test)]
mod tests;
