//! How the webhook talks to registries: per-registry access, check and copy settings, and the
//! duration syntax of the table file.
//!
//! Pure. These are read from the same file as the mapping table (`registries`, `checks`,
//! `copies`) but are not part of it: the registry layer and the mirror service are built from
//! [`Settings`], and a reload hands them the new settings (every one applies without a restart).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

mod ecr;

use ecr::check_aws;
pub use ecr::{ecr_endpoint, ecr_registry, AwsAccess, EcrRegistry, EcrRepositories};

use crate::problems::ProblemList;
use crate::reference::registry_host;

/// A value in the table or on the command line that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid duration {0:?}: write e.g. 500ms, 30s, 10m, 1h or 30d")]
    Duration(String),
    #[error("invalid platform {0:?}: expected os/arch or os/arch/variant, e.g. linux/arm64")]
    Platform(String),
    #[error("invalid size {0:?}: write e.g. 500MiB, 2GiB or 4GB")]
    Size(String),
    #[error("invalid platform {platform:?}: unknown {what} (known: {known})")]
    UnknownPlatform {
        platform: String,
        what: String,
        known: String,
    },
}

/// Per-registry access for checks and copies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegistryAccess {
    pub username_env: Option<String>,
    pub password_env: Option<String>,
    pub docker_config: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    pub ca_file: Option<String>,
    /// How blobs are pushed to this registry (default: one streamed PUT).
    pub upload_mode: Option<UploadMode>,
    /// The older spelling: `true` is `uploadMode: monolithic`, `false` is `chunked`.
    pub monolithic_upload: Option<bool>,
    /// On-demand copies from this registry wait while its `ratelimit-remaining` is at most
    /// this, leaving the rest of the window's pulls to the nodes.
    #[serde(default, deserialize_with = "rate_limit_reserve")]
    pub rate_limit_reserve: Option<u32>,
    /// An ECR registry behind a name that does not say so (a VPC endpoint, a private DNS
    /// name), or one whose account and region are to be given: its credentials come from
    /// `GetAuthorizationToken` with the webhook's own AWS identity.
    pub aws: Option<AwsAccess>,
}

/// `rateLimitReserve`, with an error that names it (serde's own says only "invalid u32").
fn rate_limit_reserve<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct Reserve;
    impl serde::de::Visitor<'_> for Reserve {
        type Value = Option<u32>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("rateLimitReserve: a whole number of pulls, 0 or more")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            u32::try_from(v).map(Some).map_err(|_| {
                E::custom(format!(
                    "rateLimitReserve: {v} is more pulls than any registry allows"
                ))
            })
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!(
                    "rateLimitReserve: {v} is negative; it is a number of pulls, 0 or more"
                ))),
            }
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "rateLimitReserve: {v} is not a whole number of pulls"
            )))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "rateLimitReserve: {v:?} is not a number of pulls"
            )))
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Reserve)
}

/// One of `choices` by name, with an error that names the setting (serde's own names only the
/// variant).
pub(crate) fn one_of<'de, D, T: Copy>(
    d: D,
    setting: &str,
    choices: &[(&str, T)],
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let word = String::deserialize(d)?;
    choose(&word, choices).map_err(|e| serde::de::Error::custom(format!("{setting}: {e}")))
}

/// The choice named `word`, or what the choices are.
pub(crate) fn choose<T: Copy>(word: &str, choices: &[(&str, T)]) -> Result<T, String> {
    match choices.iter().find(|(name, _)| *name == word) {
        Some((_, value)) => Ok(*value),
        None => {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            Err(format!("{word:?} is not one of {}", names.join(", ")))
        }
    }
}

/// How a blob is pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadMode {
    /// One streamed PUT: the fastest, and what ECR needs.
    Monolithic,
    /// A PATCH per 4 MiB piece, then a PUT: for a registry that limits request bodies.
    Chunked,
}

impl UploadMode {
    pub fn label(self) -> &'static str {
        match self {
            UploadMode::Monolithic => "monolithic",
            UploadMode::Chunked => "chunked",
        }
    }
}

impl<'de> Deserialize<'de> for UploadMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let choices = [
            ("monolithic", UploadMode::Monolithic),
            ("chunked", UploadMode::Chunked),
        ];
        one_of(d, "uploadMode", &choices)
    }
}

impl RegistryAccess {
    /// The upload mode in force for this registry.
    pub fn upload(&self) -> UploadMode {
        self.upload_mode
            .or(self.monolithic_upload.map(|m| {
                if m {
                    UploadMode::Monolithic
                } else {
                    UploadMode::Chunked
                }
            }))
            .unwrap_or(UploadMode::Monolithic)
    }
}

/// Existence-check settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSettings {
    pub present_ttl: Duration,
    pub absent_ttl: Duration,
    /// How long an answer that proves nothing (timeout, error, 401/403) is remembered, so that
    /// a registry in trouble is not asked again by every Pod (with ±20 % jitter).
    pub unknown_ttl: Duration,
    pub timeout: Duration,
    /// Checks in a row that fail before a registry's circuit opens.
    pub circuit_threshold: u32,
    /// How long a circuit first stays open; doubles per failed probe.
    pub circuit_backoff: Duration,
    pub circuit_max_backoff: Duration,
}

impl Default for CheckSettings {
    fn default() -> Self {
        CheckSettings {
            present_ttl: Duration::from_secs(600),
            absent_ttl: Duration::from_secs(30),
            unknown_ttl: Duration::from_secs(15),
            timeout: Duration::from_secs(1),
            circuit_threshold: 3,
            circuit_backoff: Duration::from_secs(5),
            circuit_max_backoff: Duration::from_secs(300),
        }
    }
}

/// Background-copy settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySettings {
    /// Copies running at once.
    pub concurrency: usize,
    /// Copies waiting to start; more are dropped (and asked for again by the next Pod).
    pub queue_size: usize,
    /// First wait before a failed copy is tried again; doubles per failure, up to 64×.
    pub retry_backoff: Duration,
    /// Tries of one copy before it is given up (the next Pod that needs it queues it again).
    pub max_attempts: u32,
    /// Where on-demand copies run.
    pub runner: Runner,
    /// How long a finished copy Job stays (its `ttlSecondsAfterFinished`).
    pub job_ttl: Duration,
    /// How long a copy Job may run before Kubernetes stops it (its `activeDeadlineSeconds`).
    pub job_deadline: Duration,
    /// The largest image (its blobs, all platforms copied) a copy takes; a larger one stops
    /// before its first blob moves and says why. `None`: no limit.
    pub max_image_size: Option<u64>,
}

impl Default for CopySettings {
    fn default() -> Self {
        CopySettings {
            concurrency: 4,
            queue_size: 256,
            retry_backoff: Duration::from_secs(30),
            max_attempts: 6,
            runner: Runner::InProcess,
            job_ttl: Duration::from_secs(600),
            job_deadline: Duration::from_secs(3600),
            max_image_size: None,
        }
    }
}

/// Where on-demand copies run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runner {
    /// In the webhook, `concurrency` at a time.
    #[default]
    InProcess,
    /// One Kubernetes Job per copy, in the webhook's namespace.
    Job,
}

impl Runner {
    /// Each runner by the name the table gives it.
    pub const CHOICES: [(&'static str, Runner); 2] =
        [("in-process", Runner::InProcess), ("job", Runner::Job)];

    pub fn label(self) -> &'static str {
        Runner::CHOICES
            .iter()
            .find(|(_, r)| *r == self)
            .map_or("", |(name, _)| name)
    }
}

/// Everything the registry layer and the mirror service are configured with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Access per canonical registry host (Docker Hub under any spelling is `docker.io`).
    registries: BTreeMap<String, RegistryAccess>,
    pub checks: CheckSettings,
    pub timeouts: Timeouts,
    pub copies: CopySettings,
    pub records: RecordSettings,
    /// The image copy Jobs run (`copies.jobImage`); default: the webhook's own.
    pub job_image: Option<String>,
    /// Per canonical registry host: the `ecr:` of the repository mirror on it.
    pub ecr_repositories: BTreeMap<String, EcrRepositories>,
}

impl Settings {
    /// Access settings of a registry host; the defaults (anonymous HTTPS) when it has none.
    pub fn access(&self, host: &str) -> Option<&RegistryAccess> {
        self.registries.get(registry_host(host))
    }
    pub fn registries(&self) -> &BTreeMap<String, RegistryAccess> {
        &self.registries
    }

    /// How a copy creates a missing repository on `host`, when its mirror says (`ecr:`).
    pub fn ecr_repositories(&self, host: &str) -> Option<&EcrRepositories> {
        self.ecr_repositories.get(registry_host(host))
    }
}

/// How long any registry request may wait (copies, `sync`, checks' own requests): for the
/// connection, for the answer's headers, and for each next piece of a body. A big layer may
/// take minutes; a silent socket must not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// From a request sent to its answer's headers (a whole manifest, which is small).
    pub response: Duration,
    /// The longest silence while a body streams (a blob up or down).
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(10),
            idle: Duration::from_secs(30),
        }
    }
}

/// `mirroredImages:`: how the `MirroredImage` records are written and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSettings {
    /// Writes to the Kubernetes API per second, all records together.
    pub writes_per_second: u32,
    /// How often an image's `lastUsed` is written, at most.
    pub used_every: Duration,
    /// How long a record made from admissions is kept once no Pod uses its image.
    pub retention: Duration,
}

impl Default for RecordSettings {
    fn default() -> Self {
        RecordSettings {
            writes_per_second: 5,
            used_every: Duration::from_secs(300),
            retention: Duration::from_secs(30 * 86_400),
        }
    }
}

/// `mirroredImages:` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawRecords {
    writes_per_second: Option<Spanned<u32>>,
    used_every: Option<Spanned<String>>,
    retention: Option<Spanned<String>>,
}

/// `timeouts:` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawTimeouts {
    connect: Option<Spanned<String>>,
    response: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
}

/// `checks:` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawChecks {
    present_ttl: Option<Spanned<String>>,
    absent_ttl: Option<Spanned<String>>,
    unknown_ttl: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    circuit_threshold: Option<Spanned<usize>>,
    circuit_backoff: Option<Spanned<String>>,
    circuit_max_backoff: Option<Spanned<String>>,
}

/// `copies:` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawCopies {
    concurrency: Option<Spanned<usize>>,
    queue_size: Option<Spanned<usize>>,
    retry_backoff: Option<Spanned<String>>,
    max_attempts: Option<Spanned<usize>>,
    runner: Option<Spanned<String>>,
    job_ttl: Option<Spanned<String>>,
    job_deadline: Option<Spanned<String>>,
    job_image: Option<Spanned<String>>,
    max_image_size: Option<Spanned<String>>,
}

/// Validates the settings sections of a table file, reporting into `problems`.
pub(crate) fn build(
    registries: &BTreeMap<String, Spanned<RegistryAccess>>,
    checks: Option<&Spanned<RawChecks>>,
    copies: Option<&Spanned<RawCopies>>,
    timeouts: Option<&Spanned<RawTimeouts>>,
    records: Option<&Spanned<RawRecords>>,
    problems: &mut ProblemList,
) -> Settings {
    let registries = registries
        .iter()
        .map(|(host, access)| {
            if access.value.username_env.is_some() != access.value.password_env.is_some() {
                problems.add(
                    access,
                    format!("registries.{host}"),
                    "usernameEnv and passwordEnv go together",
                );
            }
            if let (Some(mode), Some(mono)) =
                (access.value.upload_mode, access.value.monolithic_upload)
            {
                if (mode == UploadMode::Monolithic) != mono {
                    problems.add(
                        access,
                        format!("registries.{host}.monolithicUpload"),
                        "contradicts uploadMode: keep one of the two",
                    );
                }
            }
            if let Some(why) = crate::reference::invalid_host(registry_host(host)) {
                problems.add(access, format!("registries.{host}"), why);
            }
            if let Some(aws) = &access.value.aws {
                check_aws(host, aws, access, problems);
            }
            (registry_host(host).to_string(), access.value.clone())
        })
        .collect();
    let mut settings = Settings {
        registries,
        ..Settings::default()
    };
    if let Some(t) = timeouts {
        let t = &t.value;
        let slots = &mut settings.timeouts;
        for (value, name, slot) in [
            (&t.connect, "connect", &mut slots.connect),
            (&t.response, "response", &mut slots.response),
            (&t.idle, "idle", &mut slots.idle),
        ] {
            if let Some(v) = value {
                match parse_duration(&v.value) {
                    Ok(d) if !d.is_zero() && d <= Duration::from_secs(3600) => *slot = d,
                    Ok(_) => problems.add(
                        v,
                        format!("timeouts.{name}"),
                        "must be more than 0 and at most 1h",
                    ),
                    Err(e) => problems.add(v, format!("timeouts.{name}"), e.to_string()),
                }
            }
        }
    }
    if let Some(r) = records {
        let r = &r.value;
        let slots = &mut settings.records;
        if let Some(n) = &r.writes_per_second {
            match n.value {
                1..=1000 => slots.writes_per_second = n.value,
                _ => problems.add(
                    n,
                    "mirroredImages.writesPerSecond",
                    "must be between 1 and 1000",
                ),
            }
        }
        for (value, name, slot) in [
            (&r.used_every, "usedEvery", &mut slots.used_every),
            (&r.retention, "retention", &mut slots.retention),
        ] {
            if let Some(v) = value {
                match parse_duration(&v.value) {
                    Ok(d) if !d.is_zero() => *slot = d,
                    Ok(_) => {
                        problems.add(v, format!("mirroredImages.{name}"), "must be more than 0")
                    }
                    Err(e) => problems.add(v, format!("mirroredImages.{name}"), e.to_string()),
                }
            }
        }
    }
    if let Some(spanned) = checks {
        let c = &spanned.value;
        let checks = &mut settings.checks;
        for (value, name, slot) in [
            (&c.present_ttl, "presentTtl", &mut checks.present_ttl),
            (&c.absent_ttl, "absentTtl", &mut checks.absent_ttl),
            (&c.unknown_ttl, "unknownTtl", &mut checks.unknown_ttl),
            (&c.timeout, "timeout", &mut checks.timeout),
            (
                &c.circuit_backoff,
                "circuitBackoff",
                &mut checks.circuit_backoff,
            ),
            (
                &c.circuit_max_backoff,
                "circuitMaxBackoff",
                &mut checks.circuit_max_backoff,
            ),
        ] {
            if let Some(v) = value {
                match parse_duration(&v.value) {
                    // A check that may take no time at all can never be answered.
                    Ok(d) if d.is_zero() && name == "timeout" => {
                        problems.add(v, "checks.timeout", "must be more than 0")
                    }
                    Ok(d) => *slot = d,
                    Err(e) => problems.add(v, format!("checks.{name}"), e.to_string()),
                }
            }
        }
        if let Some(n) = &c.circuit_threshold {
            match u32::try_from(n.value) {
                Ok(t @ 1..=1000) => checks.circuit_threshold = t,
                _ => problems.add(n, "checks.circuitThreshold", "must be between 1 and 1000"),
            }
        }
        if checks.circuit_max_backoff < checks.circuit_backoff {
            let message = "must not be shorter than circuitBackoff";
            match c
                .circuit_max_backoff
                .as_ref()
                .or(c.circuit_backoff.as_ref())
            {
                Some(at) => problems.add(at, "checks.circuitMaxBackoff", message),
                None => problems.add(spanned, "checks.circuitMaxBackoff", message),
            }
        }
    }
    if let Some(c) = copies {
        let c = &c.value;
        let copies = &mut settings.copies;
        let mut attempts = copies.max_attempts as usize;
        for (value, name, max, slot) in [
            (&c.concurrency, "concurrency", 64, &mut copies.concurrency),
            (&c.queue_size, "queueSize", 100_000, &mut copies.queue_size),
            (&c.max_attempts, "maxAttempts", 100, &mut attempts),
        ] {
            if let Some(n) = value {
                if (1..=max).contains(&n.value) {
                    *slot = n.value;
                } else {
                    problems.add(
                        n,
                        format!("copies.{name}"),
                        format!("must be between 1 and {max}"),
                    );
                }
            }
        }
        copies.max_attempts = attempts as u32; // at most 100
        if let Some(v) = &c.retry_backoff {
            match parse_duration(&v.value) {
                Ok(d) if !d.is_zero() => copies.retry_backoff = d,
                Ok(_) => problems.add(v, "copies.retryBackoff", "must be more than 0"),
                Err(e) => problems.add(v, "copies.retryBackoff", e.to_string()),
            }
        }
        if let Some(v) = &c.runner {
            match choose(&v.value, &Runner::CHOICES) {
                Ok(runner) => copies.runner = runner,
                Err(e) => problems.add(v, "copies.runner", e),
            }
        }
        if let Some(v) = &c.job_ttl {
            match parse_duration(&v.value) {
                // Kubernetes counts whole seconds, in an int32.
                Ok(d) if d.as_secs() <= i32::MAX as u64 => copies.job_ttl = d,
                Ok(_) => problems.add(v, "copies.jobTtl", "must be at most 68 years"),
                Err(e) => problems.add(v, "copies.jobTtl", e.to_string()),
            }
        }
        if let Some(v) = &c.job_deadline {
            match parse_duration(&v.value) {
                Ok(d) if d.as_secs() >= 1 && d.as_secs() <= i32::MAX as u64 => {
                    copies.job_deadline = d
                }
                Ok(_) => problems.add(v, "copies.jobDeadline", "must be between 1s and 68 years"),
                Err(e) => problems.add(v, "copies.jobDeadline", e.to_string()),
            }
        }
        if let Some(v) = &c.max_image_size {
            match parse_size(&v.value) {
                Ok(n) if n > 0 => copies.max_image_size = Some(n),
                Ok(_) => problems.add(v, "copies.maxImageSize", "must be more than 0"),
                Err(e) => problems.add(v, "copies.maxImageSize", e.to_string()),
            }
        }
        if let Some(v) = &c.job_image {
            match crate::reference::Reference::parse(&v.value) {
                Ok(_) => settings.job_image = Some(v.value.clone()),
                Err(e) => problems.add(
                    v,
                    "copies.jobImage",
                    format!("{:?} is not an image reference: {e}", v.value),
                ),
            }
        }
    }
    settings
}

/// `500ms`, `30s`, `10m`, `1h`, `30d`, or a sequence such as `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let err = || ValueError::Duration(s.to_string());
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(err()),
        };
        total = total.saturating_add(unit);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// `500MiB`, `2GiB` (powers of 1024), `4GB` (of 1000), or bytes (`1048576`, `100B`).
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let err = || ValueError::Size(s.to_string());
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(err());
    }
    let n: u64 = t[..digits].parse().map_err(|_| err())?;
    let unit: u64 = match t[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(unit).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4GB"), Ok(4_000_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("big").is_err());
        assert!(parse_size("2 gigs").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(
            parse_size("2G").unwrap_err().to_string(),
            "invalid size \"2G\": write e.g. 500MiB, 2GiB or 4GB"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(
            parse_duration("5x").unwrap_err().to_string(),
            "invalid duration \"5x\": write e.g. 500ms, 30s, 10m, 1h or 30d"
        );
    }

    #[test]
    fn access_is_keyed_by_canonical_host() {
        let mut s = Settings::default();
        s.registries
            .insert("docker.io".into(), RegistryAccess::default());
        for host in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert!(s.access(host).is_some(), "{host}");
        }
        assert!(s.access("quay.io").is_none());
    }
}
