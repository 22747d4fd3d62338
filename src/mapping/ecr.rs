//! A repository mirror's `ecr:` (its repositories are made before a copy pushes into them).

use serde::Deserialize;
use serde_saphyr::Spanned;

use std::collections::BTreeMap;

use super::raw::RawMirror;
use super::Table;
use crate::problems::ProblemList;
use crate::settings::{ecr_registry, EcrRepositories, Settings};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawEcr {
    pub(super) create_repositories: Option<bool>,
    pub(super) tag_mutability: Option<Spanned<String>>,
    pub(super) scan_on_push: Option<bool>,
    pub(super) encryption: Option<Spanned<String>>,
    pub(super) kms_key: Option<Spanned<String>>,
    pub(super) lifecycle_policy: Option<Spanned<String>>,
}

const MUTABILITY: [&str; 2] = ["MUTABLE", "IMMUTABLE"];
const ENCRYPTION: [&str; 2] = ["AES256", "KMS"];

/// The `ecr:` of mirror `field`, every problem reported on its own field.
pub(super) fn build(
    raw: &Spanned<RawEcr>,
    field: &str,
    pull_through: bool,
    problems: &mut ProblemList,
) -> Option<EcrRepositories> {
    let field = format!("{field}.ecr");
    if pull_through {
        problems.add(
            raw,
            &field,
            "a pull-through cache makes its repositories itself: ecr is for repository mirrors",
        );
        return None;
    }
    let r = &raw.value;
    let mut out = EcrRepositories::default();
    if let Some(c) = r.create_repositories {
        out.create = c;
    }
    if let Some(s) = r.scan_on_push {
        out.scan_on_push = s;
    }
    let word =
        |w: &Spanned<String>, name: &str, choices: &[&'static str], problems: &mut ProblemList| {
            let found = choices
                .iter()
                .find(|c| c.eq_ignore_ascii_case(w.value.trim()))
                .copied();
            if found.is_none() {
                problems.add(
                    w,
                    format!("{field}.{name}"),
                    format!("{:?} is not one of {}", w.value, choices.join(", ")),
                );
            }
            found
        };
    if let Some(m) = &r.tag_mutability {
        out.tag_mutability = word(m, "tagMutability", &MUTABILITY, problems).unwrap_or("MUTABLE");
    }
    if let Some(e) = &r.encryption {
        out.encryption = word(e, "encryption", &ENCRYPTION, problems).unwrap_or("AES256");
    }
    if let Some(k) = &r.kms_key {
        if out.encryption != "KMS" {
            problems.add(
                k,
                format!("{field}.kmsKey"),
                "goes with encryption: KMS (AES256 takes no key)",
            );
        }
        out.kms_key = Some(k.value.clone());
    }
    if let Some(p) = &r.lifecycle_policy {
        match serde_json::from_str::<serde_json::Value>(&p.value) {
            Ok(v) if v.get("rules").is_some_and(serde_json::Value::is_array) => {
                out.lifecycle_policy = Some(p.value.clone());
            }
            Ok(_) => problems.add(
                p,
                format!("{field}.lifecyclePolicy"),
                "an ECR lifecycle policy is a JSON object with a rules list",
            ),
            Err(e) => problems.add(
                p,
                format!("{field}.lifecyclePolicy"),
                format!("not JSON: {e}"),
            ),
        }
    }
    Some(out)
}

/// Hands each mirror's `ecr:` to the registry layer (by registry host), once the registries'
/// settings are known: a mirror whose registry cannot be placed in AWS is reported there.
pub(super) fn place(
    raw: &BTreeMap<String, Spanned<RawMirror>>,
    table: &Table,
    settings: &mut Settings,
    problems: &mut ProblemList,
) {
    for m in table.mirrors() {
        let Some(ecr) = &m.ecr else { continue };
        if ecr_registry(&m.registry, settings.access(&m.registry)).is_none() {
            if let Some(at) = raw.get(&m.name).and_then(|r| r.value.ecr.as_ref()) {
                problems.add(
                    at,
                    format!("mirrors.{}.ecr", m.name),
                    format!(
                        "{} is not an ECR endpoint name: say where it is in registries.{}.aws \
                         (region, registryId)",
                        m.registry, m.registry
                    ),
                );
            }
        }
        settings
            .ecr_repositories
            .insert(m.registry.clone(), ecr.clone());
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::settings::EcrRepositories;

    const MIRROR: &str = "mirrors:\n  ecr:\n    type: repository\n    registry: 123456789012.dkr.ecr.us-east-1.amazonaws.com\n    prefix: mirror\n";

    #[test]
    fn a_repository_mirror_on_ecr_says_how_its_repositories_are_made() {
        let table = format!(
            "{MIRROR}    ecr:\n      tagMutability: immutable\n      scanOnPush: true\n      encryption: KMS\n      kmsKey: alias/mirror\n      lifecyclePolicy: '{{\"rules\": []}}'\n"
        );
        let config = Config::parse("t.yaml", &table).unwrap();
        assert_eq!(
            config
                .settings
                .ecr_repositories("123456789012.dkr.ecr.us-east-1.amazonaws.com"),
            Some(&EcrRepositories {
                create: true,
                tag_mutability: "IMMUTABLE",
                scan_on_push: true,
                encryption: "KMS",
                kms_key: Some("alias/mirror".into()),
                lifecycle_policy: Some("{\"rules\": []}".into()),
            })
        );
    }

    #[test]
    fn every_wrong_ecr_setting_is_named() {
        let table = format!(
            "{MIRROR}    ecr:\n      tagMutability: sometimes\n      encryption: AES256\n      kmsKey: alias/x\n      lifecyclePolicy: '[1]'\n"
        );
        let err = Config::parse("t.yaml", &table).err().unwrap().to_string();
        for field in [
            "mirrors.ecr.ecr.tagMutability",
            "mirrors.ecr.ecr.kmsKey",
            "mirrors.ecr.ecr.lifecyclePolicy",
        ] {
            assert!(err.contains(field), "{field}: {err}");
        }
        // Not on a pull-through cache, and not where the registry cannot be placed in AWS.
        let pull_through = "mirrors:\n  c:\n    type: pull-through\n    registry: 123456789012.dkr.ecr.us-east-1.amazonaws.com\n    upstreams: {docker.io: docker-hub}\n    ecr: {scanOnPush: true}\n";
        let err = Config::parse("t.yaml", pull_through)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ecr is for repository mirrors"), "{err}");
        let elsewhere =
            "mirrors:\n  g:\n    type: repository\n    registry: ghcr.io\n    ecr: {}\n";
        let err = Config::parse("t.yaml", elsewhere)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("registries.ghcr.io.aws"), "{err}");
    }
}
