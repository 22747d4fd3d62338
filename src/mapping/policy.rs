//! The policies of a rewrite, and how entry, rule and mirror settings combine into one.

use std::fmt;

use serde::Deserialize;

use crate::settings::{one_of, ValueError};

/// Whether a match is rewritten unconditionally or only when the mirror has the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapPolicy {
    Always,
    IfPresent,
}

/// Whether an image missing from the mirror is copied there in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPolicy {
    OnDemand,
    Off,
}

/// What a rewrite carries of the source's version: its tag (today's behaviour), or also the
/// digest the tag has upstream at admission, so that a mirror serving a stale tag cannot be
/// pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pin {
    #[default]
    Tag,
    Digest,
}

impl fmt::Display for SwapPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SwapPolicy::Always => "always",
            SwapPolicy::IfPresent => "if-present",
        })
    }
}

impl fmt::Display for CopyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CopyPolicy::OnDemand => "on-demand",
            CopyPolicy::Off => "off",
        })
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pin::Tag => "tag",
            Pin::Digest => "digest",
        })
    }
}

impl fmt::Display for Policy<'_> {
    /// `swap=if-present copy=on-demand platforms=all referrers=true pin=tag`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "swap={} copy={} platforms=", self.swap, self.copy)?;
        if self.platforms.is_empty() {
            f.write_str("all")?;
        } else {
            let names: Vec<String> = self.platforms.iter().map(ToString::to_string).collect();
            f.write_str(&names.join(","))?;
        }
        write!(f, " referrers={} pin={}", self.referrers, self.pin)
    }
}

impl<'de> Deserialize<'de> for SwapPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let choices = [
            ("always", SwapPolicy::Always),
            ("if-present", SwapPolicy::IfPresent),
        ];
        one_of(d, "swap", &choices)
    }
}

impl<'de> Deserialize<'de> for CopyPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let choices = [
            ("on-demand", CopyPolicy::OnDemand),
            ("off", CopyPolicy::Off),
        ];
        one_of(d, "copy", &choices)
    }
}

impl<'de> Deserialize<'de> for Pin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_of(d, "pin", &[("tag", Pin::Tag), ("digest", Pin::Digest)])
    }
}

/// `referrers: true|false`, with an error that names it.
pub(crate) fn referrers_flag<'de, D>(d: D) -> Result<Option<bool>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Flag;
    impl serde::de::Visitor<'_> for Flag {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("referrers: true or false")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Err(E::custom(format!("referrers: {v:?} is not true or false")))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Flag)
}

/// How a `repository` mirror names the copy of `docker.io/grafana/loki`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Naming {
    /// `<prefix>/loki`
    Flatten,
    /// `<prefix>/docker.io/grafana/loki`
    Preserve,
    /// `<prefix>/mirrored-grafana-loki`
    Rancher,
}

impl fmt::Display for Naming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Naming::Flatten => "flatten",
            Naming::Preserve => "preserve",
            Naming::Rancher => "rancher",
        })
    }
}

/// An `os/arch[/variant]` platform selector for copies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let parts: Vec<&str> = s.split('/').collect();
        let word = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| word(p)) {
            return Err(ValueError::Platform(s.to_string()));
        }
        let known = |what: &str, value: &str, list: &[&str]| {
            if list.contains(&value) {
                Ok(())
            } else {
                Err(ValueError::UnknownPlatform {
                    platform: s.to_string(),
                    what: format!("{what} {value:?}"),
                    known: list.join(", "),
                })
            }
        };
        known("os", parts[0], &OS)?;
        known("architecture", parts[1], &ARCHITECTURES)?;
        if let Some(variant) = parts.get(2) {
            let variants = variants(parts[1]);
            if variants.is_empty() {
                return Err(ValueError::UnknownPlatform {
                    platform: s.to_string(),
                    what: format!("variant {variant:?}"),
                    known: format!("no variants for {}", parts[1]),
                });
            }
            known("variant", variant, variants)?;
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

/// The `os` values of the OCI image index (Go's GOOS list).
const OS: [&str; 15] = [
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "illumos",
    "ios",
    "js",
    "linux",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
];

/// The `architecture` values of the OCI image index (Go's GOARCH list).
const ARCHITECTURES: [&str; 14] = [
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mipsle", "mips64", "mips64le", "ppc64",
    "ppc64le", "riscv64", "s390x", "wasm",
];

/// The variants the OCI image index names for an architecture (CPU feature levels).
fn variants(architecture: &str) -> &'static [&'static str] {
    match architecture {
        "arm" => &["v5", "v6", "v7", "v8"],
        "arm64" => &[
            "v8", "v8.0", "v8.1", "v8.2", "v8.3", "v8.4", "v8.5", "v8.6", "v8.7", "v8.8", "v8.9",
            "v9", "v9.0", "v9.1", "v9.2", "v9.3", "v9.4", "v9.5",
        ],
        "amd64" => &["v1", "v2", "v3", "v4"],
        "386" => &["sse2", "softfloat"],
        "ppc64le" => &["power8", "power9", "power10"],
        "riscv64" => &["rva20u64", "rva22u64"],
        _ => &[],
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The policies that apply to one rewrite, after entry, rule and mirror settings are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy<'t> {
    pub swap: SwapPolicy,
    pub copy: CopyPolicy,
    /// Platforms to copy; empty means all.
    pub platforms: &'t [Platform],
    /// Whether copies bring signatures, attestations, SBOMs and OCI referrers along.
    pub referrers: bool,
    pub pin: Pin,
}

/// The policy settings a mirror, a rule or an exact entry may set; what one leaves unset falls
/// through to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub swap: Option<SwapPolicy>,
    pub copy: Option<CopyPolicy>,
    pub platforms: Option<Vec<Platform>>,
    pub referrers: Option<bool>,
    /// Set by rules and entries only.
    pub pin: Option<Pin>,
}

impl Overrides {
    /// Each setting from the first layer that sets it (most specific first), else the default.
    pub fn resolve<'t>(
        layers: &[Option<&'t Overrides>],
        swap: SwapPolicy,
        copy: CopyPolicy,
    ) -> Policy<'t> {
        let layers = layers.iter().flatten();
        Policy {
            swap: layers.clone().find_map(|o| o.swap).unwrap_or(swap),
            copy: layers.clone().find_map(|o| o.copy).unwrap_or(copy),
            platforms: layers
                .clone()
                .find_map(|o| o.platforms.as_deref())
                .unwrap_or(&[]),
            referrers: layers.clone().find_map(|o| o.referrers).unwrap_or(true),
            pin: layers.clone().find_map(|o| o.pin).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms() {
        assert!(Platform::parse("linux/amd64").is_ok());
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("Linux/AMD64").is_err());
    }

    #[test]
    fn the_most_specific_setting_wins_each_kind_separately() {
        let arm = vec![Platform::parse("linux/arm64").unwrap()];
        let entry = Overrides {
            copy: Some(CopyPolicy::Off),
            pin: Some(Pin::Digest),
            ..Overrides::default()
        };
        let mirror = Overrides {
            swap: Some(SwapPolicy::IfPresent),
            copy: Some(CopyPolicy::OnDemand),
            platforms: Some(arm.clone()),
            referrers: Some(false),
            pin: None,
        };
        let p = Overrides::resolve(
            &[Some(&entry), Some(&mirror)],
            SwapPolicy::Always,
            CopyPolicy::OnDemand,
        );
        assert_eq!(p.swap, SwapPolicy::IfPresent);
        assert_eq!(p.copy, CopyPolicy::Off);
        assert_eq!(p.platforms, &arm[..]);
        assert_eq!((p.referrers, p.pin), (false, Pin::Digest));
        let p = Overrides::resolve(&[None], SwapPolicy::Always, CopyPolicy::Off);
        assert_eq!(
            (p.swap, p.copy, p.platforms.len(), p.referrers, p.pin),
            (SwapPolicy::Always, CopyPolicy::Off, 0, true, Pin::Tag)
        );
    }
}
