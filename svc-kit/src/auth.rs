//! Optional bearer-token authentication with two scopes, `read` and `write`.
//!
//! Tokens come from a file (`read <token>` / `write <token>` lines) and/or the environment.
//! They are kept only as SHA-256 digests and a presented token is compared against every one
//! of them in constant time (`subtle`), so neither timing nor a log line reveals a token.
//! Each service declares which of its RPCs are writes ([`Scopes`]); every other RPC needs the
//! read scope, which a write token also has. Health and reflection never need a token.
//!
//! This module is the pure decision; [`crate::layer`] applies it to requests.

use std::collections::HashSet;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq, ConstantTimeGreater};

/// What a token may do. `Write` includes `Read`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
}

impl Scope {
    fn code(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Write => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
        }
    }
}

/// Which RPCs (full gRPC paths, `/package.Service/Method`) need the write scope; every other
/// RPC needs read.
#[derive(Clone, Debug, Default)]
pub struct Scopes {
    writes: HashSet<String>,
}

impl Scopes {
    /// Every RPC is a read.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks one RPC, e.g. `/omnibus.db.v1.DatabaseService/Insert`, as a write.
    pub fn write(mut self, path: impl Into<String>) -> Self {
        self.writes.insert(path.into());
        self
    }

    /// Marks `methods` of `service` (e.g. `omnibus.db.v1.DatabaseService`) as writes.
    pub fn writes(mut self, service: &str, methods: &[&str]) -> Self {
        for method in methods {
            self.writes.insert(format!("/{service}/{method}"));
        }
        self
    }

    /// The scope an RPC needs.
    pub fn required(&self, path: &str) -> Scope {
        if self.writes.contains(path) {
            Scope::Write
        } else {
            Scope::Read
        }
    }
}

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// What the example secrets (deploy/kubernetes/secrets.example.yaml) put where a token goes.
const PLACEHOLDER: &str = "CHANGE-ME";

/// The configured tokens, as SHA-256 digests. `Debug` shows only counts.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<([u8; 32], Scope)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let writes = self.entries.iter().filter(|e| e.1 == Scope::Write).count();
        write!(
            f,
            "Tokens({} read, {} write)",
            self.entries.len() - writes,
            writes
        )
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Adds a token; the error (never containing the token) says what is wrong with it.
    pub fn add(&mut self, token: &str, scope: Scope) -> Result<(), String> {
        if token.chars().count() < MIN_TOKEN_LEN {
            return Err(format!(
                "a {} token is shorter than {MIN_TOKEN_LEN} characters",
                scope.as_str()
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "a {} token contains whitespace or control characters",
                scope.as_str()
            ));
        }
        // The placeholders of the shipped example secrets are public: deployed unedited, they
        // would let anyone who read the repository in.
        if token.to_ascii_uppercase().contains(PLACEHOLDER) {
            return Err(format!(
                "a {} token still holds the example's {PLACEHOLDER} placeholder: generate a \
                 real one (e.g. openssl rand -hex 32)",
                scope.as_str()
            ));
        }
        self.entries.push((digest(token), scope));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds every token of `other`.
    pub fn extend(&mut self, other: &Tokens) {
        self.entries.extend(other.entries.iter().cloned());
    }

    /// Parses a tokens file: one `read <token>` or `write <token>` per line; blank lines and
    /// `#` comments are ignored. Errors name the line, never the token.
    pub fn parse_file_contents(text: &str) -> Result<Self, String> {
        let mut tokens = Tokens::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let scope = match parts.next() {
                Some("read") => Scope::Read,
                Some("write") => Scope::Write,
                _ => {
                    return Err(format!(
                        "line {}: expected `read <token>` or `write <token>`",
                        n + 1
                    ));
                }
            };
            let (Some(token), None) = (parts.next(), parts.next()) else {
                return Err(format!(
                    "line {}: expected exactly one token after the scope",
                    n + 1
                ));
            };
            tokens
                .add(token, scope)
                .map_err(|e| format!("line {}: {e}", n + 1))?;
        }
        if tokens.is_empty() {
            return Err("no tokens in the file".into());
        }
        Ok(tokens)
    }

    /// The scope of `presented`, if it is a configured token. Compares the digest against
    /// every entry, without an early exit, in constant time; the highest scope wins.
    pub fn lookup(&self, presented: &str) -> Option<Scope> {
        let wanted = digest(presented);
        let mut best = 0u8;
        for (entry, scope) in &self.entries {
            let equal = entry.ct_eq(&wanted);
            let higher = scope.code().ct_gt(&best);
            best = u8::conditional_select(&best, &scope.code(), equal & higher);
        }
        match best {
            2 => Some(Scope::Write),
            1 => Some(Scope::Read),
            _ => None,
        }
    }
}

/// A clap value parser for `--auth-tokens-file`: reads and parses the file at start-up.
pub fn parse_tokens_file(path: &str) -> Result<Tokens, String> {
    let text = std::fs::read_to_string(Path::new(path))
        .map_err(|e| format!("cannot read tokens file {path}: {e}"))?;
    Tokens::parse_file_contents(&text).map_err(|e| format!("tokens file {path}: {e}"))
}

/// A token given on the command line or in the environment. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Secret(s.trim().to_string()))
    }
}

/// RPCs reachable without a token: health (probes, load balancers) and reflection (grpcurl;
/// switch it off with `--reflection false`).
/// Exact paths: a prefix would also exempt whatever else came to be served under it.
pub fn is_exempt(path: &str) -> bool {
    matches!(
        path,
        "/grpc.health.v1.Health/Check"
            | "/grpc.health.v1.Health/Watch"
            | "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
            | "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
}

/// The outcome of checking one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Health or reflection: no token needed.
    Exempt,
    /// A valid token with enough scope.
    Allowed(Scope),
    /// No token, a malformed `authorization` header, or an unknown token.
    Unauthenticated(&'static str),
    /// A valid token whose scope is too small for the RPC.
    PermissionDenied { has: Scope, needs: Scope },
}

/// Checks the `authorization` metadata of a request to `path`.
pub fn check(
    tokens: &Tokens,
    scopes: &Scopes,
    path: &str,
    authorization: Option<&[u8]>,
) -> Decision {
    if is_exempt(path) {
        return Decision::Exempt;
    }
    let Some(raw) = authorization else {
        return Decision::Unauthenticated("missing bearer token (authorization: Bearer <token>)");
    };
    let Ok(raw) = std::str::from_utf8(raw) else {
        return Decision::Unauthenticated("malformed authorization header");
    };
    let Some((scheme, token)) = raw.trim().split_once(' ') else {
        return Decision::Unauthenticated("malformed authorization header");
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Decision::Unauthenticated("authorization scheme must be Bearer");
    }
    let Some(has) = tokens.lookup(token.trim()) else {
        return Decision::Unauthenticated("invalid bearer token");
    };
    let needs = scopes.required(path);
    if has >= needs {
        Decision::Allowed(has)
    } else {
        Decision::PermissionDenied { has, needs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: &str = "read-token-0123456789";
    const WRITE: &str = "write-token-0123456789";
    const INSERT: &str = "/omnibus.db.v1.DatabaseService/Insert";
    const QUERY: &str = "/omnibus.db.v1.DatabaseService/Query";

    fn setup() -> (Tokens, Scopes) {
        let tokens =
            Tokens::parse_file_contents(&format!("# comment\n\nread {READ}\nwrite {WRITE}\n"))
                .unwrap();
        let scopes = Scopes::new().writes("omnibus.db.v1.DatabaseService", &["Insert"]);
        (tokens, scopes)
    }

    fn bearer(t: &str) -> Vec<u8> {
        format!("Bearer {t}").into_bytes()
    }

    #[test]
    fn decisions() {
        let (t, s) = setup();
        assert!(matches!(
            check(&t, &s, QUERY, None),
            Decision::Unauthenticated(_)
        ));
        assert!(matches!(
            check(&t, &s, QUERY, Some(&bearer("not-a-configured-token"))),
            Decision::Unauthenticated(_)
        ));
        assert!(matches!(
            check(&t, &s, QUERY, Some(READ.as_bytes())),
            Decision::Unauthenticated(_)
        ));
        assert!(matches!(
            check(&t, &s, QUERY, Some(format!("Basic {READ}").as_bytes())),
            Decision::Unauthenticated(_)
        ));
        assert_eq!(
            check(&t, &s, QUERY, Some(&bearer(READ))),
            Decision::Allowed(Scope::Read)
        );
        assert_eq!(
            check(&t, &s, INSERT, Some(&bearer(READ))),
            Decision::PermissionDenied {
                has: Scope::Read,
                needs: Scope::Write
            }
        );
        assert_eq!(
            check(&t, &s, INSERT, Some(&bearer(WRITE))),
            Decision::Allowed(Scope::Write)
        );
        assert_eq!(
            check(&t, &s, QUERY, Some(format!("bearer  {WRITE} ").as_bytes())),
            Decision::Allowed(Scope::Write)
        );
        for exempt in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(check(&t, &s, exempt, None), Decision::Exempt);
        }
        // Only those methods: other paths under the same names need a token.
        for guarded in [
            "/grpc.health.v1.Health/Other",
            "/grpc.reflection.v1.ServerReflection/Other",
            "/grpc.reflection.other.Service/Method",
            "/grpc.health.v1.Health/Check/",
        ] {
            assert!(
                matches!(check(&t, &s, guarded, None), Decision::Unauthenticated(_)),
                "{guarded}"
            );
        }
    }

    #[test]
    fn the_same_token_in_both_lists_has_write() {
        let mut t = Tokens::default();
        t.add(WRITE, Scope::Write).unwrap();
        t.add(WRITE, Scope::Read).unwrap();
        assert_eq!(t.lookup(WRITE), Some(Scope::Write));
        assert_eq!(t.lookup("write-token-012345678"), None);
    }

    #[test]
    fn bad_files_name_the_line_but_not_the_token() {
        let err = Tokens::parse_file_contents("read tiny").unwrap_err();
        assert!(err.contains("line 1") && !err.contains("tiny"), "{err}");
        let err = Tokens::parse_file_contents("admin abcdefghijklmnopqrstuvwxyz").unwrap_err();
        assert!(
            err.contains("line 1") && !err.contains("abcdefghijklmnop"),
            "{err}"
        );
        let err =
            Tokens::parse_file_contents("read abcdefghijklmnopq extra-token-value").unwrap_err();
        assert!(!err.contains("abcdefghijklmnopq"), "{err}");
        assert!(Tokens::parse_file_contents("# only a comment\n").is_err());
        let (t, _) = setup();
        let debug = format!("{t:?}");
        assert_eq!(debug, "Tokens(1 read, 1 write)");
        assert_eq!(format!("{:?}", Secret(READ.into())), "***");
    }

    /// The example secrets' tokens, deployed unedited, are refused rather than trusted.
    #[test]
    fn the_example_placeholders_are_refused() {
        let example = include_str!("../../deploy/kubernetes/secrets.example.yaml");
        let tokens: Vec<&str> = example
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("read ") || l.starts_with("write "))
            .collect();
        assert_eq!(tokens.len(), 2, "{example}");
        for line in tokens {
            let err = Tokens::parse_file_contents(line).unwrap_err();
            assert!(err.contains("CHANGE-ME") && err.contains("line 1"), "{err}");
        }
        let err = Tokens::default()
            .add("my-change-me-token-123", Scope::Read)
            .unwrap_err();
        assert!(err.contains("placeholder"), "{err}");
    }
}
