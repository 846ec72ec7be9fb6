//! Verifying a JWT: its header read here (so `alg: none`, unknown algorithms
//! and algorithm confusion are refused before any key is tried), the
//! signature and the registered claims by `jsonwebtoken` against the
//! [`KeyStore`]'s current keys.
//!
//! Every refusal is a [`JwtError`] with a metric label and a fixed text for
//! the client: neither ever contains the token or a claim's value.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::de::IgnoredAny;

use super::keys::KeyStore;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts with a JSON header naming `alg`.
    Malformed,
    /// `alg` is none, unknown, or one no configured key verifies.
    BadAlgorithm,
    /// The header names a `kid` no key has.
    UnknownKey,
    /// No key of its algorithm verifies the signature.
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
    /// `exp` (always), `aud` or `iss` (when configured) is absent.
    MissingClaim,
}

impl JwtError {
    /// The `outcome` label of `sttproxy_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "jwt_malformed",
            Self::BadAlgorithm => "jwt_bad_algorithm",
            Self::UnknownKey => "jwt_unknown_key",
            Self::BadSignature => "jwt_bad_signature",
            Self::Expired => "jwt_expired",
            Self::NotYetValid => "jwt_not_yet_valid",
            Self::WrongAudience => "jwt_wrong_audience",
            Self::WrongIssuer => "jwt_wrong_issuer",
            Self::MissingClaim => "jwt_missing_claim",
        }
    }

    /// What the client reads (RFC 6750's `invalid_token`, said in words).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "invalid token: malformed",
            Self::BadAlgorithm => "invalid token: algorithm not accepted",
            Self::UnknownKey => "invalid token: unknown key id",
            Self::BadSignature => "invalid token: bad signature",
            Self::Expired => "invalid token: expired",
            Self::NotYetValid => "invalid token: not yet valid",
            Self::WrongAudience => "invalid token: wrong audience",
            Self::WrongIssuer => "invalid token: wrong issuer",
            Self::MissingClaim => "invalid token: a required claim is missing",
        }
    }

    fn from_kind(kind: &ErrorKind) -> Self {
        match kind {
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidAudience => Self::WrongAudience,
            ErrorKind::InvalidIssuer => Self::WrongIssuer,
            ErrorKind::MissingRequiredClaim(_) => Self::MissingClaim,
            ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => Self::BadAlgorithm,
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat => Self::BadSignature,
            _ => Self::Malformed,
        }
    }
}

/// What a token's header says, read without trusting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHeader {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// A token's header, with only the algorithms this proxy verifies accepted.
/// A header with `crit` is refused: it names extensions that must be
/// understood, and none are (RFC 7515 §4.1.11).
pub fn parse_header(token: &str) -> Result<TokenHeader, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let b64url = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    // The signature may be empty here so that `alg: none` (which has none)
    // is refused for its algorithm; it is required once the algorithm is known.
    if !(b64url(header) && b64url(payload) && (signature.is_empty() || b64url(signature))) {
        return Err(JwtError::Malformed);
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed)?;
    let value: serde_json::Value =
        serde_json::from_slice(&json).map_err(|_| JwtError::Malformed)?;
    let object = value.as_object().ok_or(JwtError::Malformed)?;
    if object.contains_key("crit") {
        return Err(JwtError::Malformed);
    }
    let alg = match object.get("alg").and_then(serde_json::Value::as_str) {
        Some("HS256") => Algorithm::HS256,
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        Some(_) => return Err(JwtError::BadAlgorithm),
        None => return Err(JwtError::Malformed),
    };
    let kid = match object.get("kid") {
        None => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Malformed),
    };
    if signature.is_empty() {
        return Err(JwtError::Malformed);
    }
    Ok(TokenHeader { alg, kid })
}

/// The claims a token must satisfy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimRules {
    /// `aud` must name one of these; empty = `aud` not checked.
    pub audience: Vec<String>,
    /// `iss` must be one of these; empty = `iss` not checked.
    pub issuer: Vec<String>,
    /// Allowed clock difference for `exp` and `nbf` (whole seconds).
    pub leeway: Duration,
}

/// Verifies tokens against the current keys and the claim rules.
#[derive(Debug)]
pub struct Verifier {
    keys: Arc<KeyStore>,
    /// One validation per algorithm, built once.
    validations: [(Algorithm, Validation); 3],
}

impl Verifier {
    pub fn new(keys: Arc<KeyStore>, rules: &ClaimRules) -> Self {
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = rules.leeway.as_secs();
            v.validate_nbf = true;
            let mut required = vec!["exp"];
            if rules.audience.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&rules.audience);
                required.push("aud");
            }
            if !rules.issuer.is_empty() {
                v.set_issuer(&rules.issuer);
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
            (alg, v)
        };
        Self {
            keys,
            validations: [
                validation(Algorithm::HS256),
                validation(Algorithm::RS256),
                validation(Algorithm::ES256),
            ],
        }
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// `Ok` when some current key verifies `token` and its claims hold.
    pub fn verify(&self, token: &str) -> Result<(), JwtError> {
        self.verify_as::<IgnoredAny>(token).map(|_| ())
    }

    /// As [`Verifier::verify`], also reading the claim `name` of a verified
    /// token (its sticky routing key): a string as it is, a number as its
    /// decimal text; absent or of another type: `None`.
    pub fn verify_reading(&self, token: &str, name: &str) -> Result<Option<String>, JwtError> {
        let mut claims = self.verify_as::<serde_json::Map<String, serde_json::Value>>(token)?;
        Ok(match claims.remove(name) {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
    }

    fn verify_as<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, JwtError> {
        let header = parse_header(token)?;
        let keys = self.keys.current();
        // A token signed with HS256 where only RSA/EC keys are configured
        // (the RSA public key used as an HMAC secret) ends here.
        if !keys.supports(header.alg) {
            return Err(JwtError::BadAlgorithm);
        }
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(JwtError::BadAlgorithm);
        };
        let mut tried = false;
        for key in keys.candidates(header.alg, header.kid.as_deref()) {
            tried = true;
            match jsonwebtoken::decode::<T>(token, &key.key, validation) {
                Ok(data) => return Ok(data.claims),
                // Another key of the same algorithm may have signed it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
                // The signature held (it is checked first): a claim failed,
                // or the token does not decode.
                Err(e) => return Err(JwtError::from_kind(e.kind())),
            }
        }
        Err(if tried {
            JwtError::BadSignature
        } else {
            JwtError::UnknownKey
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b64(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn token(header: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64("{}"))
    }

    #[test]
    fn headers_name_a_supported_algorithm_or_are_refused() {
        assert_eq!(
            parse_header(&token(r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#)),
            Ok(TokenHeader {
                alg: Algorithm::RS256,
                kid: Some("k1".into())
            })
        );
        for (header, expected) in [
            (r#"{"alg":"none"}"#, JwtError::BadAlgorithm),
            (r#"{"alg":"HS512"}"#, JwtError::BadAlgorithm),
            (r#"{"alg":"hs256"}"#, JwtError::BadAlgorithm),
            (r#"{"typ":"JWT"}"#, JwtError::Malformed),
            (r#"{"alg":"ES256","kid":7}"#, JwtError::Malformed),
            (r#"{"alg":"ES256","crit":["b64"]}"#, JwtError::Malformed),
            (r#"["alg","ES256"]"#, JwtError::Malformed),
            ("not json", JwtError::Malformed),
        ] {
            assert_eq!(parse_header(&token(header)), Err(expected), "{header}");
        }
        // `alg: none` tokens come with an empty signature: refused for the
        // algorithm; a supported one without a signature is malformed.
        let unsigned =
            |alg: &str| format!("{}.{}.", b64(&format!(r#"{{"alg":"{alg}"}}"#)), b64("{}"));
        assert_eq!(parse_header(&unsigned("none")), Err(JwtError::BadAlgorithm));
        assert_eq!(parse_header(&unsigned("HS256")), Err(JwtError::Malformed));
        for shape in ["", "a.b", "a.b.c.d", "a..c", "YQ.YQ.YQ=", "a b.c.d"] {
            assert_eq!(parse_header(shape), Err(JwtError::Malformed), "{shape:?}");
        }
    }

    #[test]
    fn labels_are_distinct() {
        let all = [
            JwtError::Malformed,
            JwtError::BadAlgorithm,
            JwtError::UnknownKey,
            JwtError::BadSignature,
            JwtError::Expired,
            JwtError::NotYetValid,
            JwtError::WrongAudience,
            JwtError::WrongIssuer,
            JwtError::MissingClaim,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(|e| e.label()).collect();
        assert_eq!(labels.len(), all.len());
    }

    proptest! {
        /// Any input: an answer, never a panic; an accepted header came
        /// from three base64url parts.
        #[test]
        fn parse_header_never_panics(input in "[ -~]{0,200}") {
            if parse_header(&input).is_ok() {
                prop_assert_eq!(input.split('.').count(), 3);
                prop_assert!(!input.ends_with('.'));
            }
        }

        /// Well-formed headers with any extra members round-trip alg and kid.
        #[test]
        fn well_formed_headers_are_read(
            alg in prop_oneof!["HS256", "RS256", "ES256"],
            kid in proptest::option::of("[ -~]{0,20}"),
            extra in "[a-z]{1,8}",
        ) {
            let mut header = serde_json::json!({"alg": alg, "typ": "JWT"});
            header[extra.as_str()] = serde_json::Value::from(1);
            if let Some(k) = &kid {
                header["kid"] = serde_json::Value::from(k.clone());
            }
            let parsed = parse_header(&token(&header.to_string()));
            if extra == "crit" {
                prop_assert_eq!(parsed, Err(JwtError::Malformed));
            } else if extra == "kid" || extra == "alg" {
                // The extra member replaced a real one: not asserted here.
            } else {
                let parsed = parsed.unwrap();
                prop_assert_eq!(format!("{:?}", parsed.alg), alg);
                prop_assert_eq!(parsed.kid, kid);
            }
        }
    }
}
