//! Docker image references: parsing and normalisation.
//!
//! A port of `ParseNormalizedNamed` from the distribution `reference` package (the grammar Docker
//! and containerd use), written by hand so that it allocates little and can say precisely what is
//! wrong. Pure: no I/O.
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [domain '/'] path-component ['/' path-component]*
//! domain           := host [':' port-number]
//! host             := domain-name | '[' ipv6 ']'
//! path-component   := alpha-numeric [separator alpha-numeric]*
//! separator        := /[_.]|__|[-]+/
//! tag              := /[\w][\w.-]{0,127}/
//! digest           := algorithm ':' hex    (sha256, sha384, sha512; lowercase hex of exact length)
//! ```

use std::borrow::Cow;
use std::fmt;

/// The registry Docker uses when a reference names none.
pub const DOCKER_HUB: &str = "docker.io";
/// The legacy spelling of Docker Hub that distribution rewrites to [`DOCKER_HUB`].
const LEGACY_DOCKER_HUB: &str = "index.docker.io";
/// Docker Hub's registry endpoint, as containerd configurations name it.
const REGISTRY_ENDPOINT: &str = "registry-1.docker.io";
/// The repository namespace of Docker Hub's official images.
const OFFICIAL_PREFIX: &str = "library/";
/// Upper bound on the repository path, as in distribution.
pub const MAX_PATH_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("a 64-character hexadecimal string is an image ID, not a reference")]
    ImageId,
    #[error("uppercase letter in repository path {0:?}")]
    UppercasePath(String),
    #[error("invalid registry host {0:?}")]
    InvalidDomain(String),
    #[error("invalid repository path component {component:?} in {path:?}")]
    InvalidPathComponent { component: String, path: String },
    #[error("empty repository path component in {0:?}")]
    EmptyPathComponent(String),
    #[error("repository path longer than {MAX_PATH_LEN} characters ({0})")]
    PathTooLong(usize),
    #[error(
        "invalid tag {0:?}: a tag is 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
    )]
    InvalidTag(String),
    #[error("{}", digest_problem(.0))]
    InvalidDigestFormat(String),
    #[error("unsupported digest algorithm {0:?}: expected sha256, sha384 or sha512")]
    UnsupportedDigest(String),
    #[error("{}", digest_problem(.0))]
    InvalidDigestHex(String),
}

/// What is wrong with a digest, said as its user can fix it.
fn digest_problem(digest: &str) -> String {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return format!(
            "invalid digest {digest:?}: a digest is algorithm:hex, e.g. sha256: and 64 \
             hexadecimal characters"
        );
    };
    let length = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => {
            return format!(
                "invalid digest {digest:?}: {algorithm:?} is no digest algorithm (sha256, \
                 sha384, sha512)"
            )
        }
    };
    if hex.len() != length {
        format!(
            "invalid digest {digest:?}: a {algorithm} digest is {length} hexadecimal characters, \
             not {}",
            hex.len()
        )
    } else {
        format!("invalid digest {digest:?}: the digest must be lowercase hexadecimal (0-9, a-f)")
    }
}

/// A parsed, normalised image reference.
///
/// Held as its canonical string with offsets, so that the parts and the name are borrowed
/// slices: a reference costs one allocation.
///
/// `registry` is empty only in the rare case distribution also allows: a first component that
/// looked like a host (it has a `.`) but is not a valid one, yet is a valid path component
/// (`foo_bar.com/x`). Such a name has no registry and is never rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `registry/path[:tag][@digest]`
    canonical: String,
    /// Where the path starts: 0 when there is no registry.
    path_start: usize,
    /// End of the path (start of `:tag`, `@digest` or the end).
    path_end: usize,
    /// End of `:tag` (start of `@digest` or the end); equals `path_end` when there is no tag.
    tag_end: usize,
}

fn find_byte(s: &str, byte: u8) -> Option<usize> {
    s.bytes().position(|b| b == byte)
}

impl Reference {
    /// Parses `input` with `ParseNormalizedNamed` semantics: implicit `docker.io`, `library/`
    /// for single-component Docker Hub names, `index.docker.io` as `docker.io`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if input.len() == 64
            && input
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(ReferenceError::ImageId);
        }
        let (domain, remainder) = split_docker_domain(input);
        let official = domain == DOCKER_HUB && find_byte(remainder, b'/').is_none();
        let mut canonical = String::with_capacity(domain.len() + 9 + remainder.len());
        canonical.push_str(domain);
        canonical.push('/');
        if official {
            canonical.push_str(OFFICIAL_PREFIX);
        }
        canonical.push_str(remainder);
        let rem_start = domain.len() + 1;
        let rem = &canonical[rem_start..];

        // distribution checks case on everything before the first ':' of the remainder.
        let remote = &rem[..find_byte(rem, b':').unwrap_or(rem.len())];
        if remote.bytes().any(|b| b.is_ascii_uppercase()) {
            let path = &remote[..find_byte(remote, b'@').unwrap_or(remote.len())];
            return Err(ReferenceError::UppercasePath(path.to_string()));
        }

        let at = find_byte(rem, b'@');
        let name_and_tag = &rem[..at.unwrap_or(rem.len())];
        let colon = find_byte(name_and_tag, b':');
        let path = &name_and_tag[..colon.unwrap_or(name_and_tag.len())];
        validate_path(path)?;
        if let Some(c) = colon {
            validate_tag(&name_and_tag[c + 1..])?;
        }
        if let Some(a) = at {
            validate_digest(&rem[a + 1..])?;
        }
        let path_end = rem_start + path.len();
        let tag_end = rem_start + name_and_tag.len();

        // The grammar's optional domain group is tried first; when the first component is not a
        // valid host, distribution falls back to reading it as part of the path.
        let path_start = if valid_domain(domain) {
            rem_start
        } else if valid_path_component(domain) {
            0
        } else {
            return Err(ReferenceError::InvalidDomain(domain.to_string()));
        };
        if path_end - path_start > MAX_PATH_LEN {
            return Err(ReferenceError::PathTooLong(path_end - path_start));
        }
        Ok(Reference {
            canonical,
            path_start,
            path_end,
            tag_end,
        })
    }

    /// Builds a reference from parts, validated through [`Reference::parse`] so that a
    /// composition can never yield something the grammar rejects.
    pub fn from_parts(
        registry: &str,
        path: &str,
        tag: Option<&str>,
        digest: Option<&str>,
    ) -> Result<Self, ReferenceError> {
        let mut s = String::with_capacity(registry.len() + path.len() + 80);
        s.push_str(registry);
        s.push('/');
        s.push_str(path);
        push_tag_digest(&mut s, tag, digest);
        Reference::parse(&s)
    }

    /// `name` (`registry/path`) with a tag or digest; `None` when the result is not a reference.
    pub fn from_parts_str(name: &str, tag: Option<&str>, digest: Option<&str>) -> Option<Self> {
        let mut s = String::with_capacity(name.len() + 80);
        s.push_str(name);
        push_tag_digest(&mut s, tag, digest);
        Reference::parse(&s).ok()
    }

    /// The registry host (with port), e.g. `docker.io`, `localhost:5000`, `[::1]:5000`.
    pub fn registry(&self) -> &str {
        if self.path_start == 0 {
            ""
        } else {
            &self.canonical[..self.path_start - 1]
        }
    }
    /// The repository path, e.g. `library/nginx`.
    pub fn path(&self) -> &str {
        &self.canonical[self.path_start..self.path_end]
    }
    pub fn tag(&self) -> Option<&str> {
        (self.tag_end > self.path_end).then(|| &self.canonical[self.path_end + 1..self.tag_end])
    }
    pub fn digest(&self) -> Option<&str> {
        (self.canonical.len() > self.tag_end).then(|| &self.canonical[self.tag_end + 1..])
    }
    /// `registry/path`, without tag or digest: what rules match on.
    pub fn name(&self) -> &str {
        &self.canonical[..self.path_end]
    }
    /// The canonical string, as [`fmt::Display`] writes it.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }
    /// The tag a pull would use: the given one, or `latest` when neither tag nor digest is given.
    pub fn effective_tag(&self) -> Option<&str> {
        match (self.tag(), self.digest()) {
            (Some(tag), _) => Some(tag),
            (None, None) => Some("latest"),
            (None, Some(_)) => None,
        }
    }
    /// The familiar short form Docker prints: `nginx:1.27`, `grafana/loki`, `quay.io/x/y`.
    pub fn familiar(&self) -> String {
        let name = if self.registry() == DOCKER_HUB {
            match self.path().strip_prefix(OFFICIAL_PREFIX) {
                Some(rest) if !rest.contains('/') => rest,
                _ => self.path(),
            }
        } else {
            self.name()
        };
        format!("{name}{}", &self.canonical[self.path_end..])
    }
    /// Whether this is a Docker Hub reference, under any of its spellings.
    pub fn is_docker_hub(&self) -> bool {
        canonical_host(self.registry()) == DOCKER_HUB
    }
    /// The same image under Docker Hub's canonical spelling: `registry-1.docker.io/nginx` (the
    /// endpoint containerd configurations name, which distribution does not alias) becomes
    /// `docker.io/library/nginx`. Every other reference is itself.
    pub fn canonical(&self) -> Cow<'_, Reference> {
        if self.registry() == DOCKER_HUB || !self.is_docker_hub() {
            return Cow::Borrowed(self);
        }
        let mut s = String::with_capacity(self.canonical.len() + 8);
        s.push_str(DOCKER_HUB);
        s.push('/');
        if !self.path().contains('/') {
            s.push_str(OFFICIAL_PREFIX);
        }
        s.push_str(&self.canonical[self.path_start..]);
        Reference::parse(&s).map_or(Cow::Borrowed(self), Cow::Owned)
    }
}

/// The canonical string: `registry/path[:tag][@digest]`, tag and digest as given.
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

/// The one Docker Hub canonicaliser for hosts: Docker Hub under any spelling a user may write
/// (`docker.io`, the legacy `index.docker.io`, the `registry-1.docker.io` endpoint) is
/// `docker.io`; every other host is returned as it is. Matching, checks, copies and credentials
/// all key registries through it.
pub fn canonical_host(host: &str) -> &str {
    match host {
        LEGACY_DOCKER_HUB | REGISTRY_ENDPOINT => DOCKER_HUB,
        other => other,
    }
}

/// A registry as users name it in a table or a docker `config.json` key
/// (`https://index.docker.io/v1/`, `ghcr.io`, `localhost:5000`) → its canonical host.
pub fn registry_host(key: &str) -> &str {
    let host = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    canonical_host(host.split('/').next().unwrap_or(host))
}

/// The host requests for `host` go to: Docker Hub's registry API is not served at `docker.io`.
pub fn wire_host(host: &str) -> &str {
    match canonical_host(host) {
        DOCKER_HUB => LEGACY_DOCKER_HUB,
        other => other,
    }
}

pub(crate) fn push_tag_digest(s: &mut String, tag: Option<&str>, digest: Option<&str>) {
    if let Some(tag) = tag {
        s.push(':');
        s.push_str(tag);
    }
    if let Some(digest) = digest {
        s.push('@');
        s.push_str(digest);
    }
}

/// distribution's `splitDockerDomain`: the first component is a registry only if it contains
/// `.` or `:`, is `localhost`, or has an uppercase letter.
fn split_docker_domain(name: &str) -> (&str, &str) {
    let slash = find_byte(name, b'/');
    let (domain, remainder) = match slash.map(|i| (&name[..i], &name[i + 1..])) {
        Some((first, rest))
            if first.bytes().any(|b| b == b'.' || b == b':')
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    };
    if domain == LEGACY_DOCKER_HUB {
        (DOCKER_HUB, remainder)
    } else {
        (domain, remainder)
    }
}

fn validate_path(path: &str) -> Result<(), ReferenceError> {
    for component in path.split('/') {
        if component.is_empty() {
            return Err(ReferenceError::EmptyPathComponent(path.to_string()));
        }
        if !valid_path_component(component) {
            return Err(ReferenceError::InvalidPathComponent {
                component: component.to_string(),
                path: path.to_string(),
            });
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
pub(crate) fn valid_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = matches!(sep, b"." | b"_" | b"__") || sep.iter().all(|&c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `host[:port]` where host is a dotted domain name or a bracketed IPv6 address.
fn valid_domain(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        let addr = &rest[..end];
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return false;
        }
        (None, &rest[end + 1..])
    } else {
        match domain.find(':') {
            Some(i) => (Some(&domain[..i]), &domain[i..]),
            None => (Some(domain), ""),
        }
    };
    if let Some(host) = host {
        if !host.split('.').all(valid_domain_component) {
            return false;
        }
    }
    match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// `[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`
fn valid_domain_component(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
}

fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(b[0])
        && b.iter().all(|&c| word(c) || c == b'.' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag(tag.to_string()))
    }
}

/// The reference grammar's digest pattern, then go-digest's check of the algorithm and length.
fn validate_digest(digest: &str) -> Result<(), ReferenceError> {
    let format_err = || ReferenceError::InvalidDigestFormat(digest.to_string());
    let (algorithm, hex) = digest.split_once(':').ok_or_else(format_err)?;
    let algorithm_ok = !algorithm.is_empty()
        && algorithm.split(['-', '_', '+', '.']).all(|part| {
            let b = part.as_bytes();
            !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
        });
    if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format_err());
    }
    let expected_len = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(ReferenceError::UnsupportedDigest(algorithm.to_string())),
    };
    if hex.len() != expected_len || hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ReferenceError::InvalidDigestHex(digest.to_string()));
    }
    Ok(())
}

/// Why `host` cannot be a registry host, when it cannot: not the grammar's, or a port out of
/// range.
pub fn invalid_host(host: &str) -> Option<String> {
    let parsed = Reference::from_parts(host, "x", None, None).map(|r| r.registry().to_string());
    if parsed.as_deref() != Ok(host) {
        return Some(format!("invalid registry host {host:?}"));
    }
    let port = host
        .rsplit_once(':')
        .filter(|(h, _)| !h.ends_with(']') || host.contains("]:"));
    match port.map(|(_, p)| p.parse::<u32>()) {
        Some(Ok(p)) if !(1..=65535).contains(&p) => {
            Some(format!("port {p} is out of range (1-65535)"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";

    fn norm(s: &str) -> Result<String, ReferenceError> {
        Reference::parse(s).map(|r| r.to_string())
    }

    #[test]
    fn normalises_like_distribution() {
        let cases = [
            ("nginx", "docker.io/library/nginx"),
            ("nginx:1.27", "docker.io/library/nginx:1.27"),
            ("docker.io/nginx", "docker.io/library/nginx"),
            ("index.docker.io/nginx", "docker.io/library/nginx"),
            ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
            ("grafana/loki:3.5.7", "docker.io/grafana/loki:3.5.7"),
            ("localhost/foo", "localhost/foo"),
            ("localhost:5000/foo/bar:v1", "localhost:5000/foo/bar:v1"),
            ("127.0.0.1:5000/library/debian", "127.0.0.1:5000/library/debian"),
            ("192.168.0.1", "docker.io/library/192.168.0.1"),
            ("192.168.0.1:80", "docker.io/library/192.168.0.1:80"),
            ("[fc00::1]:5000/docker/docker", "[fc00::1]:5000/docker/docker"),
            ("[fc00::1]/docker", "[fc00::1]/docker"),
            ("Docker/docker", "Docker/docker"),
            ("registry-1.docker.io/library/nginx", "registry-1.docker.io/library/nginx"),
            ("foo_bar.com/baz", "foo_bar.com/baz"),
            ("a__b/c---d/e.f_g", "docker.io/a__b/c---d/e.f_g"),
            (
                "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
                "docker.io/library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
        let with_digest = format!("busybox:1.36@{D}");
        assert_eq!(
            norm(&with_digest).unwrap(),
            format!("docker.io/library/busybox:1.36@{D}")
        );
        assert_eq!(
            norm(&format!("busybox@{D}")).unwrap(),
            format!("docker.io/library/busybox@{D}")
        );
    }

    #[test]
    fn rejects_what_distribution_rejects() {
        let invalid = [
            "",
            "https://github.com/docker/docker",
            "docker/Docker",
            "-docker",
            "-docker/docker",
            "-docker.io/docker/docker",
            "docker///docker",
            "docker.io/docker/Docker",
            "docker.io/docker///docker",
            "[fc00::1]",
            "[fc00::1]:5000",
            "fc00::1:5000/debian",
            "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
            "docker/",
            "dock_.er/docker",
            "dock-.er/docker",
            "____/____",
            "a..b",
            "a___b",
            "a-_b",
            "foo:",
            "foo:-tag",
            "foo:.tag",
            "foo@sha256:abc",
            "foo@md5:86e0e091d0da6bde2456dbb48306f395",
            "foo:a:b",
            "foo@sha256:86E0E091D0DA6BDE2456DBB48306F3956BBEB2EAE1B5B9A43045843F69FE4AAA",
            "localhost:/foo",
            "example.com:80a/foo",
        ];
        for input in invalid {
            assert!(
                norm(input).is_err(),
                "{input} should be invalid: {:?}",
                norm(input)
            );
        }
        let long_tag = format!("foo:{}", "a".repeat(129));
        assert!(norm(&long_tag).is_err());
        assert!(norm(&format!("foo:{}", "a".repeat(128))).is_ok());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            Reference::parse("docker/Docker").unwrap_err().to_string(),
            "uppercase letter in repository path \"docker/Docker\""
        );
        let long = format!("{}/docker", "a".repeat(260));
        assert!(Reference::parse(&long)
            .unwrap_err()
            .to_string()
            .starts_with("repository path longer than 255 characters"));
        assert!(matches!(
            Reference::parse("foo@sha1:86e0e091d0da6bde2456dbb48306f3956bbeb2ea"),
            Err(ReferenceError::UnsupportedDigest(_))
        ));
    }

    #[test]
    fn path_limit_counts_the_path_not_the_host() {
        let path = "a".repeat(255);
        assert!(Reference::parse(&format!("example.com/{path}")).is_ok());
        assert!(Reference::parse(&format!("example.com/{path}a")).is_err());
        // Docker Hub's implicit `library/` counts towards the limit, as in distribution.
        assert!(Reference::parse(&"a".repeat(248)).is_err());
        assert!(Reference::parse(&"a".repeat(247)).is_ok());
    }

    #[test]
    fn familiar_form() {
        let cases = [
            ("docker.io/library/nginx:1.27", "nginx:1.27"),
            ("docker.io/grafana/loki", "grafana/loki"),
            ("docker.io/library/foo/bar", "library/foo/bar"),
            ("quay.io/minio/minio:latest", "quay.io/minio/minio:latest"),
        ];
        for (input, want) in cases {
            assert_eq!(Reference::parse(input).unwrap().familiar(), want);
        }
    }

    #[test]
    fn docker_hub_spellings_have_one_canonical_form() {
        for host in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(canonical_host(host), "docker.io");
            assert_eq!(wire_host(host), "index.docker.io");
        }
        assert_eq!(canonical_host("ghcr.io"), "ghcr.io");
        assert_eq!(registry_host("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(registry_host("http://localhost:5000"), "localhost:5000");
        assert_eq!(registry_host("quay.io"), "quay.io");
        let endpoint = Reference::parse("registry-1.docker.io/nginx:1").unwrap();
        assert!(endpoint.is_docker_hub());
        assert_eq!(endpoint.canonical().as_str(), "docker.io/library/nginx:1");
        let org = Reference::parse(&format!("registry-1.docker.io/grafana/loki@{D}")).unwrap();
        assert_eq!(
            org.canonical().as_str(),
            format!("docker.io/grafana/loki@{D}")
        );
        let plain = Reference::parse("quay.io/a/b").unwrap();
        assert!(matches!(plain.canonical(), Cow::Borrowed(_)));
    }

    #[test]
    fn parts() {
        let r = Reference::parse(&format!("localhost:5000/a/b:v1@{D}")).unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.path(), "a/b");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.name(), "localhost:5000/a/b");
        assert_eq!(
            Reference::parse("nginx").unwrap().effective_tag(),
            Some("latest")
        );
    }
}
