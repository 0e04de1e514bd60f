//! The AWS shared configuration and credentials files (`~/.aws/config`, `~/.aws/credentials`,
//! or `AWS_CONFIG_FILE`, `AWS_SHARED_CREDENTIALS_FILE`), read for the profile `AWS_PROFILE`
//! names (else `default`), as the AWS CLI and SDKs read them. `object_store` reads the
//! environment only; operators who configured the CLI expect deltadoc to find the same keys.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use ini::Ini;
use object_store::aws::AmazonS3Builder;

/// What a profile sets that deltadoc uses.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Profile {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    role_arn: Option<String>,
    web_identity_token_file: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
}

impl Profile {
    /// The profile, if either file exists; `Err` when a named profile is missing or asks for
    /// what deltadoc cannot do (single sign-on, a credential process).
    pub fn load(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let home = env("HOME").map(PathBuf::from).unwrap_or_default();
        let config = env("AWS_CONFIG_FILE").map(PathBuf::from).unwrap_or_else(|| home.join(".aws/config"));
        let creds = env("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from).unwrap_or_else(|| home.join(".aws/credentials"));
        let named = env("AWS_PROFILE");
        let name = named.clone().unwrap_or_else(|| "default".into());
        let read = |p: &PathBuf| -> Result<Option<Ini>> {
            match std::fs::read_to_string(p) {
                Ok(text) => {
                    Ini::load_from_str(&text).map(Some).with_context(|| format!("{}: not an AWS profile file", p.display()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("{}: cannot read", p.display())),
            }
        };
        let (config_ini, creds_ini) = (read(&config)?, read(&creds)?);
        // The config file names profiles `[profile x]` (the default one `[default]`); the
        // credentials file `[x]`.
        let in_config = config_ini.as_ref().and_then(|i| {
            i.section(Some(format!("profile {name}")))
                .or_else(|| (name == "default").then(|| i.section(Some("default"))).flatten())
        });
        let in_creds = creds_ini.as_ref().and_then(|i| i.section(Some(name.as_str())));
        if in_config.is_none() && in_creds.is_none() {
            if named.is_some() {
                bail!("AWS_PROFILE={name:?}: no such profile in {} or {}", config.display(), creds.display());
            }
            return Ok(None);
        }
        let get = |k: &str| in_creds.and_then(|s| s.get(k)).or_else(|| in_config.and_then(|s| s.get(k))).map(str::to_string);
        for unsupported in ["sso_session", "sso_start_url", "credential_process"] {
            if get(unsupported).is_some() && get("aws_access_key_id").is_none() {
                bail!(
                    "AWS profile {name:?} uses {unsupported}, which deltadoc does not run; give it keys, a web identity \
                     (role_arn with web_identity_token_file), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                );
            }
        }
        let endpoint = in_config.and_then(|s| s.get("endpoint_url")).map(str::to_string);
        Ok(Some(Self {
            access_key_id: get("aws_access_key_id"),
            secret_access_key: get("aws_secret_access_key"),
            session_token: get("aws_session_token"),
            role_arn: get("role_arn"),
            web_identity_token_file: get("web_identity_token_file"),
            region: get("region"),
            endpoint,
        }))
    }

    /// Whether the profile names credentials (keys, or a role with a web identity token).
    pub fn has_credentials(&self) -> bool {
        (self.access_key_id.is_some() && self.secret_access_key.is_some())
            || (self.role_arn.is_some() && self.web_identity_token_file.is_some())
    }

    /// Sets the profile's credentials on `b`.
    pub fn apply(self, mut b: AmazonS3Builder) -> AmazonS3Builder {
        if let (Some(id), Some(secret)) = (self.access_key_id, self.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(t) = self.session_token {
                b = b.with_token(t);
            }
        } else if let (Some(role), Some(file)) = (self.role_arn, self.web_identity_token_file) {
            use object_store::aws::AmazonS3ConfigKey as K;
            b = b.with_config(K::RoleArn, role).with_config(K::WebIdentityTokenFile, file);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_read_from_both_files_as_the_aws_cli_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "[default]\nregion = eu-west-1\n[profile scanner]\nregion = eu-central-1\nendpoint_url = https://minio.internal:9000\n\
             [profile sso]\nsso_session = corp\n",
        )
        .unwrap();
        std::fs::write(dir.path().join(".aws/credentials"), "[scanner]\naws_access_key_id = AKIA1\naws_secret_access_key = s\n")
            .unwrap();
        let home = dir.path().to_string_lossy().into_owned();
        let with = |profile: Option<&str>| {
            let (home, profile) = (home.clone(), profile.map(str::to_string));
            Profile::load(&move |k| match k {
                "HOME" => Some(home.clone()),
                "AWS_PROFILE" => profile.clone(),
                _ => None,
            })
        };
        let p = with(Some("scanner")).unwrap().unwrap();
        assert_eq!((p.region.as_deref(), p.endpoint.as_deref()), (Some("eu-central-1"), Some("https://minio.internal:9000")));
        assert_eq!((p.access_key_id.as_deref(), p.secret_access_key.as_deref()), (Some("AKIA1"), Some("s")));
        assert_eq!(with(None).unwrap().unwrap().region.as_deref(), Some("eu-west-1"));
        let e = with(Some("nope")).unwrap_err().to_string();
        assert!(e.contains("no such profile"), "{e}");
        let e = with(Some("sso")).unwrap_err().to_string();
        assert!(e.contains("sso_session"), "{e}");
    }
}
