//! Registry credentials: environment variables or a docker `config.json`, else anonymous.
//! Errors name the variable, file or key, never a value.

use std::collections::HashMap;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::failure::{CredentialError, DockerConfigError};
use crate::reference::registry_host;
use crate::settings::RegistryAccess;

/// Credentials for a registry: environment variables first, then a docker config file, else
/// anonymous. An optional Secret that is not there (both variables unset, the file absent)
/// also means anonymous: public images still work.
pub async fn credentials(
    host: &str,
    access: &RegistryAccess,
) -> Result<RegistryAuth, CredentialError> {
    if let (Some(user_var), Some(pass_var)) = (&access.username_env, &access.password_env) {
        let read = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
        return match (read(user_var), read(pass_var)) {
            (Some(user), Some(pass)) => Ok(RegistryAuth::Basic(user, pass)),
            (None, None) => {
                tracing::debug!(host, "credential variables unset; anonymous");
                Ok(RegistryAuth::Anonymous)
            }
            (None, Some(_)) => Err(CredentialError::HalfSet {
                set: pass_var.clone(),
                unset: user_var.clone(),
            }),
            (Some(_), None) => Err(CredentialError::HalfSet {
                set: user_var.clone(),
                unset: pass_var.clone(),
            }),
        };
    }
    if let Some(path) = &access.docker_config {
        let text = match tokio::fs::read(path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(host, file = %path, "docker config file absent; anonymous");
                return Ok(RegistryAuth::Anonymous);
            }
            Err(source) => {
                return Err(CredentialError::Read {
                    path: path.clone(),
                    source,
                })
            }
        };
        return docker_config_auth(&text, host)
            .map_err(|source| CredentialError::DockerConfig {
                path: path.clone(),
                source,
            })
            .map(|found| found.unwrap_or(RegistryAuth::Anonymous));
    }
    Ok(RegistryAuth::Anonymous)
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: Option<HashMap<String, DockerAuth>>,
    #[serde(flatten)]
    legacy: HashMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Finds `host` in a docker `config.json` / `.dockerconfigjson` (or the legacy `.dockercfg`
/// shape without `auths`). Keys may be URLs (`https://index.docker.io/v1/`).
pub fn docker_config_auth(
    text: &[u8],
    host: &str,
) -> Result<Option<RegistryAuth>, DockerConfigError> {
    let config: DockerConfig =
        serde_json::from_slice(text).map_err(|e| DockerConfigError::NotJson {
            // serde's message can quote the value it choked on, which may be a credential:
            // only where and what kind of problem.
            category: match e.classify() {
                serde_json::error::Category::Io => "unreadable",
                serde_json::error::Category::Syntax => "not valid JSON",
                serde_json::error::Category::Data => "not the shape of a docker config",
                serde_json::error::Category::Eof => "cut short",
            },
            line: e.line(),
            column: e.column(),
        })?;
    let auths: HashMap<String, DockerAuth> = match config.auths {
        Some(a) => a,
        None => config
            .legacy
            .into_iter()
            .filter_map(|(k, v)| serde_json::from_value(v).ok().map(|a| (k, a)))
            .collect(),
    };
    let want = registry_host(host);
    let Some((key, entry)) = auths.into_iter().find(|(k, _)| registry_host(k) == want) else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(RegistryAuth::Basic(u.clone(), p.clone())));
    }
    if let Some(encoded) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| DockerConfigError::NotBase64(key.clone()))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| DockerConfigError::NotUtf8(key.clone()))?;
        let (u, p) = decoded
            .split_once(':')
            .ok_or_else(|| DockerConfigError::NotUserPassword(key.clone()))?;
        return Ok(Some(RegistryAuth::Basic(u.to_string(), p.to_string())));
    }
    if entry.identitytoken.is_some() {
        return Err(DockerConfigError::IdentityToken(key));
    }
    Err(DockerConfigError::NoCredentials(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Report;

    #[test]
    fn docker_config_shapes() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("robot:generated");
        let basic = |u: &str, p: &str| Some(RegistryAuth::Basic(u.into(), p.into()));
        let cases: Vec<(String, &str, Option<RegistryAuth>)> = vec![
            (
                format!(r#"{{"auths":{{"ghcr.io":{{"auth":"{b64}"}}}}}}"#),
                "ghcr.io",
                basic("robot", "generated"),
            ),
            (
                format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}}}}}}"#),
                "docker.io",
                basic("robot", "generated"),
            ),
            (
                r#"{"auths":{"quay.io":{"username":"u","password":"p"}}}"#.into(),
                "quay.io",
                basic("u", "p"),
            ),
            (
                format!(r#"{{"registry.local:5000":{{"auth":"{b64}"}}}}"#),
                "registry.local:5000",
                basic("robot", "generated"),
            ),
            (
                format!(r#"{{"auths":{{"ghcr.io":{{"auth":"{b64}"}}}}}}"#),
                "quay.io",
                None,
            ),
        ];
        for (text, host, want) in cases {
            assert_eq!(
                docker_config_auth(text.as_bytes(), host),
                Ok(want),
                "{text} for {host}"
            );
        }
        let err = docker_config_auth(br#"{"auths":{"ghcr.io":{"auth":"!!"}}}"#, "ghcr.io")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"ghcr.io\"") && err.contains("base64"),
            "{err}"
        );
        // A value of the wrong type: serde would quote it ("invalid type: string \"…\""), and it
        // may be a credential. Only where, and what kind of problem.
        let secret = "s3cr3t-value-never-printed";
        for text in [
            format!(
                r#"{{"auths":{{"ghcr.io":{{"auth":"x","username":7,"password":"{secret}"}}}}}}"#
            ),
            format!(r#"{{"auths":{{"ghcr.io":{{"password":["{secret}"]}}}}}}"#),
            format!(r#"{{"auths":{{"ghcr.io":"{secret}"}}}}"#),
            format!(r#"{{"auths":{{"ghcr.io":{{"password":"{secret}"#),
        ] {
            let err = docker_config_auth(text.as_bytes(), "ghcr.io")
                .unwrap_err()
                .to_string();
            assert!(
                !err.contains(secret) && err.contains("at line 1, column"),
                "{err}"
            );
        }
        let err = docker_config_auth(br#"{"auths":{"ghcr.io":{"identitytoken":"x"}}}"#, "ghcr.io")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("identity token") && !err.contains("\"x\""),
            "{err}"
        );
    }

    #[tokio::test]
    async fn env_credentials_unset_mean_anonymous_half_set_names_the_variable() {
        let access = RegistryAccess {
            username_env: Some("IMW_TEST_SURELY_UNSET_USER".into()),
            password_env: Some("IMW_TEST_SURELY_UNSET_PASS".into()),
            ..RegistryAccess::default()
        };
        assert_eq!(
            credentials("docker.io", &access).await.unwrap(),
            RegistryAuth::Anonymous
        );
        // One of the two set is a mistake worth an error naming both (never their values).
        let half = RegistryAccess {
            username_env: Some("IMW_TEST_SURELY_UNSET_USER".into()),
            password_env: Some("PATH".into()),
            ..RegistryAccess::default()
        };
        let err = credentials("docker.io", &half).await.unwrap_err();
        let err = Report(&err).to_string();
        assert!(!err.contains(&std::env::var("PATH").unwrap()), "{err}");
        assert!(
            err.contains("IMW_TEST_SURELY_UNSET_USER") && err.contains("PATH"),
            "{err}"
        );
        let absent = RegistryAccess {
            docker_config: Some("/nonexistent/.dockerconfigjson".into()),
            ..RegistryAccess::default()
        };
        assert_eq!(
            credentials("ghcr.io", &absent).await.unwrap(),
            RegistryAuth::Anonymous
        );
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("config.json");
        std::fs::write(&garbage, "not json").unwrap();
        let bad = RegistryAccess {
            docker_config: Some(garbage.display().to_string()),
            ..RegistryAccess::default()
        };
        let err = credentials("ghcr.io", &bad).await.unwrap_err();
        let err = Report(&err).to_string();
        assert!(
            err.contains("config.json") && err.contains("not a docker config file"),
            "{err}"
        );
    }
}
