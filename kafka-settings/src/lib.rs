//! librdkafka client settings given by operators (SASL, SSL, anything else), as every Kafka
//! client of the project reads them: environment variables `KAFKA_SECURITY_PROTOCOL`,
//! `KAFKA_SASL_*` and `KAFKA_SSL_*`, mapped to librdkafka names by dropping `KAFKA_`,
//! lower-casing and turning `_` into `.` (`KAFKA_SASL_MECHANISMS` -> `sasl.mechanisms`,
//! `KAFKA_SSL_CA_LOCATION` -> `ssl.ca.location`), and `key=value` pairs (`--kafka-config`,
//! env `KAFKA_CONFIG`, `;`-separated) for any other property; the pairs win. Pure: the
//! services (svc-kit) and the client library and CLI apply them to their own clients, with
//! [`apply`] when the `rdkafka` feature is on.

/// One `key=value` librdkafka property. `Debug` hides the value (it may be a password).
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSetting {
    pub key: String,
    pub value: String,
}

impl std::fmt::Debug for KafkaSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}=***", self.key)
    }
}

/// The clap value parser for `--kafka-config` / `KAFKA_CONFIG`: [`parse_setting`], with an
/// error that names the problem but not the value. (clap's own error for a bad value repeats
/// it, and these values are SASL passwords and key passphrases.)
#[derive(Clone, Copy, Debug, Default)]
pub struct SettingParser;

impl clap::builder::TypedValueParser for SettingParser {
    type Value = KafkaSetting;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<KafkaSetting, clap::Error> {
        let name = arg.map_or("--kafka-config".to_string(), |a| a.to_string());
        let raw = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                format!("{name}: a setting is not valid UTF-8\n"),
            )
        })?;
        parse_setting(raw).map_err(|e| {
            // Only a key that looks like a property name (no secret) helps find the entry.
            let key = raw.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
                k.len() <= 64 && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
            });
            let entry = match key {
                Some(k) => format!("the entry for '{k}'"),
                None => "an entry".to_string(),
            };
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{name}: {e} ({entry}; values are not shown)\n"),
            )
        })
    }
}

/// A clap value parser for `--kafka-config key=value`.
pub fn parse_setting(raw: &str) -> Result<KafkaSetting, String> {
    // An empty entry (`KAFKA_CONFIG=` or `a=1;;b=2`) is no setting; `install` drops it.
    if raw.trim().is_empty() {
        return Ok(KafkaSetting {
            key: String::new(),
            value: String::new(),
        });
    }
    let (key, value) = raw
        .split_once('=')
        .ok_or_else(|| "expected key=value (a librdkafka property)".to_string())?;
    let key = key.trim();
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_'))
    {
        return Err("the key must be a librdkafka property name, e.g. security.protocol".into());
    }
    if matches!(key, "bootstrap.servers" | "metadata.broker.list") {
        return Err("set the brokers with KAFKA_BROKERS / --kafka-brokers".into());
    }
    Ok(KafkaSetting {
        key: key.to_string(),
        value: value.trim().to_string(),
    })
}

/// The settings derived from `KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*`, `KAFKA_SSL_*` in `vars`.
pub fn from_env_vars(vars: impl IntoIterator<Item = (String, String)>) -> Vec<KafkaSetting> {
    let mut out: Vec<KafkaSetting> = vars
        .into_iter()
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix("KAFKA_")?;
            if rest == "SECURITY_PROTOCOL" || rest.starts_with("SASL_") || rest.starts_with("SSL_")
            {
                Some(KafkaSetting {
                    key: rest.to_ascii_lowercase().replace('_', "."),
                    value,
                })
            } else {
                None
            }
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The environment's settings followed by `explicit` ones (empty entries dropped): the order in
/// which they are to be applied, so the explicit ones win.
pub fn merged(explicit: &[KafkaSetting]) -> Vec<KafkaSetting> {
    let mut all = from_env_vars(std::env::vars());
    all.extend(explicit.iter().filter(|s| !s.key.is_empty()).cloned());
    all
}

/// Sets `settings` on `config`, in order (feature `rdkafka`).
#[cfg(feature = "rdkafka")]
pub fn apply<'c>(
    config: &'c mut rdkafka::ClientConfig,
    settings: &[KafkaSetting],
) -> &'c mut rdkafka::ClientConfig {
    for setting in settings {
        config.set(&setting.key, &setting.value);
    }
    config
}

/// `e` as text that never shows a setting's value: librdkafka's configuration errors
/// (`KafkaError::ClientConfig`) carry the rejected value, which may be a password (feature
/// `rdkafka`).
#[cfg(feature = "rdkafka")]
pub fn describe_error(e: &rdkafka::error::KafkaError) -> String {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, description, key, _value) => {
            format!("invalid Kafka setting {key}: {description}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration error names the setting, never its value.
    #[cfg(feature = "rdkafka")]
    #[test]
    fn kafka_config_errors_do_not_show_values() {
        let mut config = rdkafka::ClientConfig::new();
        config.set("sasl.pasword", "hunter2");
        let e = config
            .create::<rdkafka::producer::BaseProducer>()
            .err()
            .expect("an unknown property is refused");
        assert!(
            e.to_string().contains("hunter2"),
            "librdkafka's own text does"
        );
        let shown = describe_error(&e);
        assert!(shown.contains("sasl.pasword"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    /// A rejected setting's error never repeats its value (it may be a password).
    #[test]
    fn flag_errors_do_not_show_values() {
        use clap::builder::TypedValueParser;
        let cmd = clap::Command::new("t");
        let err = |raw: &str| {
            SettingParser
                .parse_ref(&cmd, None, std::ffi::OsStr::new(raw))
                .unwrap_err()
                .to_string()
        };
        let e = err("sasl-password=hunter2");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("bootstrap.servers=secret-host:9092");
        assert!(
            !e.contains("secret-host") && e.contains("'bootstrap.servers'"),
            "{e}"
        );
        let e = err("hunter2");
        assert!(!e.contains("hunter2"), "{e}");
        let ok = SettingParser
            .parse_ref(&cmd, None, std::ffi::OsStr::new("sasl.password=hunter2"))
            .unwrap();
        assert_eq!(
            (ok.key.as_str(), ok.value.as_str()),
            ("sasl.password", "hunter2")
        );
    }

    #[test]
    fn maps_environment_names() {
        let got = from_env_vars([
            (
                "KAFKA_SECURITY_PROTOCOL".to_string(),
                "SASL_SSL".to_string(),
            ),
            (
                "KAFKA_SASL_MECHANISMS".to_string(),
                "SCRAM-SHA-512".to_string(),
            ),
            ("KAFKA_SSL_CA_LOCATION".to_string(), "/ca.pem".to_string()),
            ("KAFKA_BROKERS".to_string(), "a:1".to_string()),
            ("KAFKA_TOPIC_PREFIX".to_string(), "dev.".to_string()),
        ]);
        let pairs: Vec<(&str, &str)> = got
            .iter()
            .map(|s| (s.key.as_str(), s.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("sasl.mechanisms", "SCRAM-SHA-512"),
                ("security.protocol", "SASL_SSL"),
                ("ssl.ca.location", "/ca.pem"),
            ]
        );
    }

    #[test]
    fn parses_and_hides_settings() {
        let s = parse_setting("sasl.password=hunter2=x").unwrap();
        assert_eq!(
            (s.key.as_str(), s.value.as_str()),
            ("sasl.password", "hunter2=x")
        );
        assert_eq!(format!("{s:?}"), "sasl.password=***");
        assert!(parse_setting("novalue").is_err());
        assert!(parse_setting(" ").unwrap().key.is_empty());
        assert!(parse_setting("bad key=1").is_err());
        assert!(parse_setting("bootstrap.servers=a:1").is_err());
    }
}
