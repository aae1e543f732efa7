//! Configuration helpers: parse flags/environment with one clear line on error, and keep
//! secrets out of anything that may be logged.

use clap::Parser;

/// Exit code for a configuration error (as `sysexits.h` EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;

/// Parses the command line (with environment fallbacks). On a bad or missing setting, prints
/// one line naming it and exits with [`EXIT_CONFIG`]; `--help`/`--version` behave as usual.
pub fn parse_or_exit<T: Parser>() -> T {
    match T::try_parse() {
        Ok(config) => config,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let rendered = e.render().to_string();
            let first = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid configuration");
            fail(first.trim_start_matches("error: "))
        }
    }
}

/// Parses `args` ignoring every environment fallback: for hermetic tests of configuration
/// (a developer's exported `DATABASE_URL` must not change their outcome).
pub fn parse_args_ignoring_env<T: Parser>(
    args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
) -> Result<T, clap::Error> {
    let command = T::command().mut_args(|arg| arg.env(None));
    let matches = command.try_get_matches_from(args)?;
    T::from_arg_matches(&matches)
}

/// Prints `configuration error: <message>` and exits with [`EXIT_CONFIG`].
pub fn fail(message: impl std::fmt::Display) -> ! {
    let bin = std::env::args().next().map(|a| {
        std::path::Path::new(&a)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or(a)
    });
    eprintln!(
        "{}: configuration error: {message}",
        bin.unwrap_or_default()
    );
    std::process::exit(EXIT_CONFIG)
}

/// A URL with its credentials - user, password, query string (an API key travels in any of
/// them: `https://KEY@collector`, `?api_key=`) - replaced by `***`, safe to log.
pub fn redact_url(raw: &str) -> String {
    // Without a scheme (`user:key@collector:4317`, which the OTLP exporter accepts and
    // completes), `user` would parse as the scheme and the rest stay an opaque, unredacted
    // path: such a URL is read with a stand-in scheme, shown without it.
    if !raw.contains("://") {
        let shown = redact_url(&format!("http://{raw}"));
        return match shown.strip_prefix("http://") {
            Some(rest) => rest.to_string(),
            None => shown,
        };
    }
    match url::Url::parse(raw) {
        Ok(url) if url.cannot_be_a_base() => "<unparsable url>".to_string(),
        Ok(mut url) => {
            if !url.username().is_empty() {
                let _ = url.set_username("***");
            }
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            if url.query().is_some() {
                url.set_query(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparsable url>".to_string(),
    }
}

/// `message` (an error a library wrote about `raw`, a URL) with `raw` redacted in it.
pub fn redact_url_in(message: &str, raw: &str) -> String {
    if raw.is_empty() {
        return message.to_string();
    }
    message.replace(raw, &redact_url(raw))
}

/// Parses a comma-separated `host:port` list (Kafka bootstrap servers), naming `setting` in
/// the error.
pub fn parse_host_ports(setting: &str, raw: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (host, port) = entry
            .rsplit_once(':')
            .ok_or_else(|| format!("{setting}: '{entry}' is not host:port"))?;
        if host.is_empty() {
            return Err(format!("{setting}: '{entry}' has no host"));
        }
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{setting}: '{entry}' has an invalid port"))?;
        out.push(entry.to_string());
    }
    if out.is_empty() {
        return Err(format!("{setting} is empty"));
    }
    Ok(out)
}

/// The Kafka bootstrap list from `KAFKA_BROKERS` (preferred) or `KAFKA_BOOTSTRAP_SERVERS`,
/// validated and joined for librdkafka; `Ok(None)` when neither is set. Errors name the
/// variable that was used.
pub fn kafka_brokers(
    brokers: Option<&str>,
    bootstrap_servers: Option<&str>,
) -> Result<Option<String>, String> {
    let (name, raw) = match (brokers, bootstrap_servers) {
        (Some(b), _) => ("KAFKA_BROKERS", b),
        (None, Some(b)) => ("KAFKA_BOOTSTRAP_SERVERS", b),
        (None, None) => return Ok(None),
    };
    Ok(Some(parse_host_ports(name, raw)?.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:s3cret@db:5432/x"),
            "postgres://***:***@db:5432/x"
        );
        assert_eq!(
            redact_url("https://APIKEY@collector:4317"),
            "https://***@collector:4317/"
        );
        assert_eq!(
            redact_url("https://collector:4317/v1?api_key=s3cret"),
            "https://collector:4317/v1?***"
        );
        assert_eq!(
            redact_url("http://collector:4317"),
            "http://collector:4317/"
        );
        assert!(!redact_url("not a url s3cret").contains("s3cret"));
        // No scheme: the OTLP exporter adds one, and the credentials are still hidden.
        assert_eq!(
            redact_url("user:s3cret@collector:4317"),
            "***:***@collector:4317/"
        );
        assert_eq!(redact_url("collector:4317"), "collector:4317/");
        assert!(!redact_url("mailto:s3cret@x").contains("s3cret"));
        let raw = "https://u:s3cret@collector:4317";
        let said = format!("endpoint '{raw}' uses HTTPS but no TLS feature is enabled");
        let shown = redact_url_in(&said, raw);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("collector:4317"), "{shown}");
    }

    #[test]
    fn parses_broker_lists() {
        assert_eq!(
            parse_host_ports("KAFKA_BROKERS", "a:9092, b:9093").unwrap(),
            vec!["a:9092", "b:9093"]
        );
        assert!(
            parse_host_ports("KAFKA_BROKERS", "a")
                .unwrap_err()
                .contains("KAFKA_BROKERS")
        );
        assert!(parse_host_ports("KAFKA_BROKERS", "a:x").is_err());
        assert!(parse_host_ports("KAFKA_BROKERS", ":9092").is_err());
        assert!(parse_host_ports("KAFKA_BROKERS", " , ").is_err());
        assert_eq!(kafka_brokers(None, None).unwrap(), None);
        assert_eq!(
            kafka_brokers(Some("a:1"), Some("b:2")).unwrap().as_deref(),
            Some("a:1")
        );
        assert!(
            kafka_brokers(None, Some("b"))
                .unwrap_err()
                .contains("KAFKA_BOOTSTRAP_SERVERS")
        );
    }
}
