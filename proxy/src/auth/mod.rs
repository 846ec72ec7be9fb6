//! Who may open a session: the listener's authentication mode, API keys and
//! JWT bearer tokens (docs/configuration.md, "Authentication").
//!
//! [`Authenticator::check`] is the one decision the listener asks for, on the
//! request's headers and query, before the upgrade. Its answer carries what
//! the 101 must say (the subprotocol to answer when a token came as one) and
//! its refusals carry a metric label and a fixed text: a token never reaches
//! a log, a metric or a response.

pub mod jwt;
pub mod keys;
pub mod token;

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::handshake::Refusal;
use jwt::{ClaimRules, Verifier};
use keys::{KeyFiles, KeyStore, KeyWatch};
use token::TokenSource;

/// What a client must present to upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Anyone may upgrade.
    None,
    /// One of `api_keys`.
    ApiKey,
    /// A valid JWT.
    Jwt,
    /// One of `api_keys` or a valid JWT.
    Either,
}

impl AuthMode {
    /// The mode in force: `explicit` when given (checked against what is
    /// configured, so no configured credential is silently ignored and none
    /// required is missing), else derived from what is configured — which
    /// keeps the behaviour of a settings file without `auth`.
    pub fn resolve(
        explicit: Option<AuthMode>,
        has_api_keys: bool,
        has_jwt: bool,
    ) -> Result<AuthMode, String> {
        let derived = match (has_api_keys, has_jwt) {
            (false, false) => AuthMode::None,
            (true, false) => AuthMode::ApiKey,
            (false, true) => AuthMode::Jwt,
            (true, true) => AuthMode::Either,
        };
        let Some(mode) = explicit else {
            return Ok(derived);
        };
        let (needs_keys, needs_jwt) = match mode {
            AuthMode::None => (false, false),
            AuthMode::ApiKey => (true, false),
            AuthMode::Jwt => (false, true),
            AuthMode::Either => (true, true),
        };
        let name = mode.as_str();
        match (needs_keys, has_api_keys, needs_jwt, has_jwt) {
            (true, false, _, _) => Err(format!("auth = \"{name}\" needs api_keys")),
            (_, _, true, false) => Err(format!("auth = \"{name}\" needs a [jwt] section")),
            (false, true, _, _) => Err(format!(
                "auth = \"{name}\" would ignore the api_keys that are set (remove them, or use \
                 auth = \"api_key\" or \"either\")"
            )),
            (_, _, false, true) => Err(format!(
                "auth = \"{name}\" would ignore the [jwt] section (remove it, or use auth = \
                 \"jwt\" or \"either\")"
            )),
            _ => Ok(mode),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::ApiKey => "api_key",
            AuthMode::Jwt => "jwt",
            AuthMode::Either => "either",
        }
    }
}

/// The `[jwt]` section of the settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// A file holding the HS256 secret (surrounding whitespace trimmed; at
    /// least 32 bytes).
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM files of RSA public keys (RS256).
    pub rsa_public_key_files: Vec<PathBuf>,
    /// PEM files of EC P-256 public keys (ES256).
    pub ec_public_key_files: Vec<PathBuf>,
    /// A JWKS file (RFC 7517): its RSA, EC P-256 and symmetric keys.
    pub jwks_file: Option<PathBuf>,
    /// Tokens' `aud` must name one of these; empty = not checked.
    pub audience: Vec<String>,
    /// Tokens' `iss` must be one of these; empty = not checked.
    pub issuer: Vec<String>,
    /// Clock difference allowed on `exp` and `nbf` (whole seconds).
    #[serde(with = "crate::config::settings::human_duration")]
    pub leeway: Duration,
    /// How often the key files are read to notice a change.
    #[serde(with = "crate::config::settings::human_duration")]
    pub reload_interval: Duration,
    /// Where tokens are taken from, tried in this order.
    pub sources: Vec<TokenSource>,
    /// The query parameter of the `query` source. Removed from the
    /// parameters the backend's `session.start` gets whenever JWT is on.
    pub query_parameter: String,
    /// The `Sec-WebSocket-Protocol` value prefix of the `subprotocol` source.
    pub subprotocol_prefix: String,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            hs256_secret_file: None,
            rsa_public_key_files: Vec::new(),
            ec_public_key_files: Vec::new(),
            jwks_file: None,
            audience: Vec::new(),
            issuer: Vec::new(),
            leeway: Duration::from_secs(30),
            reload_interval: Duration::from_secs(5),
            sources: vec![TokenSource::Header, TokenSource::Subprotocol],
            query_parameter: "access_token".into(),
            subprotocol_prefix: "bearer.".into(),
        }
    }
}

impl JwtSettings {
    pub fn key_files(&self) -> KeyFiles {
        KeyFiles {
            hs256_secret: self.hs256_secret_file.clone(),
            rsa_public_keys: self.rsa_public_key_files.clone(),
            ec_public_keys: self.ec_public_key_files.clone(),
            jwks: self.jwks_file.clone(),
        }
    }

    /// What cannot work, named by key (the files themselves are read at start).
    pub fn validate(&self) -> Result<(), String> {
        if self.key_files().is_empty() {
            return Err(
                "[jwt] needs a key: hs256_secret_file, rsa_public_key_files, \
                        ec_public_key_files or jwks_file"
                    .into(),
            );
        }
        if self.leeway > Duration::from_secs(3600) {
            return Err("jwt.leeway must be at most 1h".into());
        }
        if self.reload_interval < Duration::from_millis(10)
            || self.reload_interval > Duration::from_secs(86_400)
        {
            return Err("jwt.reload_interval is out of range (10ms to 1day)".into());
        }
        if self.sources.is_empty() {
            return Err("jwt.sources must name at least one of header, subprotocol, query".into());
        }
        if self.query_parameter.is_empty() {
            return Err("jwt.query_parameter must not be empty".into());
        }
        // A prefix must be a token (RFC 7230 tchar) to fit in the header,
        // and end with a separator so no real protocol name is taken for it.
        let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if self.subprotocol_prefix.is_empty() || !self.subprotocol_prefix.chars().all(tchar) {
            return Err("jwt.subprotocol_prefix must be a non-empty header token".into());
        }
        Ok(())
    }
}

/// A JWT setup ready to verify: the verifier and where tokens come from.
#[derive(Debug)]
struct JwtAuth {
    verifier: Verifier,
    sources: Vec<TokenSource>,
    query_parameter: String,
    subprotocol_prefix: String,
}

/// Why authentication failed to start.
#[derive(Debug, thiserror::Error)]
#[error("jwt keys: {0}")]
pub struct AuthError(#[from] keys::KeyError);

/// A request that may upgrade, with what its 101 must answer.
#[derive(Debug, Default)]
pub struct Granted {
    /// The `Sec-WebSocket-Protocol` to answer (a token came as a subprotocol).
    pub protocol: Option<HeaderValue>,
    /// The verified token's key claim ([`Authenticator::with_key_claim`]),
    /// when a token granted the request and carries it.
    pub key_claim: Option<String>,
}

/// A refused request: its refusal and, for a 401, the `WWW-Authenticate`
/// challenge (RFC 6750 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    pub refusal: Refusal,
    pub challenge: Option<&'static str>,
}

impl Denied {
    fn missing() -> Self {
        Self {
            refusal: Refusal {
                status: StatusCode::UNAUTHORIZED,
                label: "unauthorized",
                reason: "missing or invalid credentials",
            },
            challenge: Some("Bearer"),
        }
    }

    fn invalid_token(e: jwt::JwtError) -> Self {
        Self {
            refusal: Refusal {
                status: StatusCode::UNAUTHORIZED,
                label: e.label(),
                reason: e.reason(),
            },
            challenge: Some("Bearer error=\"invalid_token\""),
        }
    }
}

/// The listener's authentication.
#[derive(Debug)]
pub struct Authenticator {
    mode: AuthMode,
    api_keys: Vec<String>,
    jwt: Option<JwtAuth>,
    /// A claim to read from verified tokens (sticky routing's key).
    key_claim: Option<String>,
}

impl Authenticator {
    /// Load the keys (if JWT is on) and build the checks. The returned
    /// [`KeyWatch`] is for [`keys::watch`], which the caller runs on a task
    /// it owns.
    pub fn new(
        mode: AuthMode,
        api_keys: Vec<String>,
        jwt: Option<&JwtSettings>,
    ) -> Result<(Self, Option<KeyWatch>), AuthError> {
        let uses_jwt = matches!(mode, AuthMode::Jwt | AuthMode::Either);
        let (jwt, watch) = match jwt.filter(|_| uses_jwt) {
            None => (None, None),
            Some(s) => {
                let watch = KeyStore::load(s.key_files())?;
                let rules = ClaimRules {
                    audience: s.audience.clone(),
                    issuer: s.issuer.clone(),
                    leeway: s.leeway,
                };
                (
                    Some(JwtAuth {
                        verifier: Verifier::new(watch.store.clone(), &rules),
                        sources: s.sources.clone(),
                        query_parameter: s.query_parameter.clone(),
                        subprotocol_prefix: s.subprotocol_prefix.clone(),
                    }),
                    Some(watch),
                )
            }
        };
        Ok((
            Self {
                mode,
                api_keys,
                jwt,
                key_claim: None,
            },
            watch,
        ))
    }

    /// No authentication (the library default).
    pub fn open() -> Self {
        Self {
            mode: AuthMode::None,
            api_keys: Vec::new(),
            jwt: None,
            key_claim: None,
        }
    }

    /// Read the claim `name` of every verified token into
    /// [`Granted::key_claim`].
    pub fn with_key_claim(mut self, name: Option<String>) -> Self {
        self.key_claim = name;
        self
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Whether query parameter `name` is a token, never forwarded to a backend.
    pub fn is_token_parameter(&self, name: &str) -> bool {
        self.jwt.as_ref().is_some_and(|j| j.query_parameter == name)
    }

    /// May this request upgrade?
    pub fn check(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Granted, Denied> {
        let mut granted = Granted::default();
        let api_key_ok = || self.api_key_presented(headers);
        match self.mode {
            AuthMode::None => Ok(granted),
            AuthMode::ApiKey if api_key_ok() => Ok(granted),
            AuthMode::ApiKey => Err(Denied::missing()),
            AuthMode::Either if api_key_ok() => Ok(granted),
            AuthMode::Jwt | AuthMode::Either => {
                let Some(jwt) = &self.jwt else {
                    return Err(Denied::missing());
                };
                let token = self.jwt_token(jwt, headers, query, &mut granted)?;
                let Some(token) = token else {
                    return Err(Denied::missing());
                };
                match &self.key_claim {
                    None => jwt.verifier.verify(&token).map_err(Denied::invalid_token)?,
                    Some(name) => {
                        granted.key_claim = jwt
                            .verifier
                            .verify_reading(&token, name)
                            .map_err(Denied::invalid_token)?;
                    }
                }
                Ok(granted)
            }
        }
    }

    /// The token from the first enabled source that has one. A subprotocol
    /// token fills in the protocol to answer (and is refused with 400 when
    /// no other protocol was offered to answer with).
    fn jwt_token(
        &self,
        jwt: &JwtAuth,
        headers: &HeaderMap,
        query: Option<&str>,
        granted: &mut Granted,
    ) -> Result<Option<String>, Denied> {
        for source in &jwt.sources {
            let token = match source {
                TokenSource::Header => headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(token::bearer)
                    // With `either`, an opaque bearer value is a wrong API
                    // key, not a malformed JWT.
                    .filter(|t| self.mode != AuthMode::Either || t.contains('.'))
                    .map(str::to_string),
                TokenSource::Subprotocol => {
                    let offered = token::subprotocols(
                        headers
                            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                            .iter()
                            .filter_map(|v| v.to_str().ok()),
                        &jwt.subprotocol_prefix,
                    );
                    match (offered.token, offered.answer) {
                        (None, _) => None,
                        (Some(_), None) => {
                            return Err(Denied {
                                refusal: Refusal {
                                    status: StatusCode::BAD_REQUEST,
                                    label: "bad_request",
                                    reason: "a token subprotocol must be offered with the \
                                             protocol to answer (e.g. stt)",
                                },
                                challenge: None,
                            });
                        }
                        (Some(t), Some(answer)) => {
                            granted.protocol = HeaderValue::from_str(answer).ok();
                            Some(t.to_string())
                        }
                    }
                }
                TokenSource::Query => {
                    query.and_then(|q| token::query_parameter(q, &jwt.query_parameter))
                }
            };
            if token.is_some() {
                return Ok(token);
            }
        }
        Ok(None)
    }

    /// An API key in `Authorization: Bearer` or `x-api-key`.
    fn api_key_presented(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(token::bearer);
        let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        [bearer, x_api_key].into_iter().flatten().any(|p| {
            self.api_keys
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), p.as_bytes()))
        })
    }
}

/// Compare secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_mode_follows_what_is_configured() {
        assert_eq!(AuthMode::resolve(None, false, false), Ok(AuthMode::None));
        assert_eq!(AuthMode::resolve(None, true, false), Ok(AuthMode::ApiKey));
        assert_eq!(AuthMode::resolve(None, false, true), Ok(AuthMode::Jwt));
        assert_eq!(AuthMode::resolve(None, true, true), Ok(AuthMode::Either));
    }

    #[test]
    fn an_explicit_mode_must_match_what_is_configured() {
        use AuthMode::*;
        assert_eq!(AuthMode::resolve(Some(Either), true, true), Ok(Either));
        assert_eq!(AuthMode::resolve(Some(None), false, false), Ok(None));
        for (mode, keys, jwt, says) in [
            (Jwt, false, false, "needs a [jwt] section"),
            (ApiKey, false, true, "needs api_keys"),
            (Either, true, false, "needs a [jwt] section"),
            (None, true, false, "would ignore the api_keys"),
            (Jwt, true, true, "would ignore the api_keys"),
            (ApiKey, true, true, "would ignore the [jwt] section"),
        ] {
            let err = AuthMode::resolve(Some(mode), keys, jwt).unwrap_err();
            assert!(err.contains(says), "{mode:?} {keys} {jwt}: {err}");
        }
    }

    #[test]
    fn api_keys_are_taken_from_bearer_or_x_api_key() {
        let auth = Authenticator {
            mode: AuthMode::ApiKey,
            api_keys: vec!["k1".into()],
            jwt: Option::None,
            key_claim: Option::None,
        };
        let with = |name: &'static str, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(value));
            auth.check(&h, Option::None)
                .map(|_| ())
                .map_err(|d| d.refusal.label)
        };
        assert_eq!(with("authorization", "Bearer k1"), Ok(()));
        assert_eq!(with("x-api-key", "k1"), Ok(()));
        assert_eq!(with("authorization", "Bearer k2"), Err("unauthorized"));
        assert_eq!(with("x-api-key", "k"), Err("unauthorized"));
        assert_eq!(
            auth.check(&HeaderMap::new(), Option::None)
                .map(|_| ())
                .map_err(|d| d.challenge),
            Err(Some("Bearer"))
        );
    }

    #[test]
    fn the_default_jwt_settings_need_only_a_key() {
        let s = JwtSettings::default();
        assert!(s.validate().unwrap_err().contains("needs a key"));
        let s = JwtSettings {
            jwks_file: Some("/k.json".into()),
            ..JwtSettings::default()
        };
        assert_eq!(s.validate(), Ok(()));
        for (bad, key) in [
            (
                JwtSettings {
                    subprotocol_prefix: "bearer ".into(),
                    ..s.clone()
                },
                "subprotocol_prefix",
            ),
            (
                JwtSettings {
                    sources: vec![],
                    ..s.clone()
                },
                "sources",
            ),
            (
                JwtSettings {
                    leeway: Duration::from_secs(7200),
                    ..s.clone()
                },
                "leeway",
            ),
        ] {
            assert!(bad.validate().unwrap_err().contains(key), "{key}");
        }
    }
}
