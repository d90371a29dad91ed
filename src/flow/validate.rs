//! The first step of a payment: validate. Pure functions over the header value and the body
//! bytes, reporting every bad field at once; nothing here touches a socket or the database.

use serde_json::{Map, Value};

use crate::error::{ApiError, FieldError};
use crate::ids::is_visible_ascii;
use crate::store::idempotency::NewPayment;

const MAX_AMOUNT: i64 = 99_999_999;

/// The `Idempotency-Key` header: 1–255 visible ASCII, optionally as an RFC 8941 string.
pub fn idempotency_key(header: Option<&str>) -> Result<String, ApiError> {
    let raw = header.ok_or(ApiError::IdempotencyKeyMissing)?;
    let raw = raw.trim();
    let key = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => unescape_sf_string(inner).ok_or_else(|| {
            ApiError::IdempotencyKeyInvalid("Idempotency-Key is not a valid quoted string".into())
        })?,
        None => raw.to_string(),
    };
    if is_visible_ascii(&key, 255) {
        Ok(key)
    } else {
        Err(ApiError::IdempotencyKeyInvalid(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ))
    }
}

/// RFC 8941 sf-string content: `\"` and `\\` are the only escapes.
fn unescape_sf_string(inner: &str) -> Option<String> {
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                _ => return None,
            },
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// The members of a JSON object, and the names that occur more than once. serde_json's own
/// map keeps the last of duplicate keys without a word (`{"amount":1,"amount":777}` would
/// charge 777), so the object is read member by member here.
#[derive(Debug, Default)]
struct Members {
    fields: Map<String, Value>,
    duplicates: Vec<String>,
}

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut m = Members::default();
                while let Some(name) = map.next_key::<String>()? {
                    let value: Value = map.next_value()?;
                    if m.fields.contains_key(&name) {
                        if !m.duplicates.contains(&name) {
                            m.duplicates.push(name);
                        }
                    } else {
                        m.fields.insert(name, value);
                    }
                }
                Ok(m)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Validates the body of `POST /payments`, reporting every bad field at once.
pub fn parse_new_payment(body: &[u8]) -> Result<NewPayment, ApiError> {
    let Members {
        mut fields,
        duplicates,
    } = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(match e.classify() {
            // The only type the members can have is "any value": a data error is the top level.
            serde_json::error::Category::Data => "the body must be a JSON object".to_string(),
            _ => format!("the body is not valid JSON: {e}"),
        })
    })?;
    let mut errors: Vec<FieldError> = duplicates
        .iter()
        .map(|name| FieldError::new(name, "appears more than once"))
        .collect();
    let amount = match fields.remove("amount") {
        // A number with no fractional part is that integer, however it is written (`1999`,
        // `1999.0`, `1.999e3`), as JSON Schema's `integer` and JSON parsers that keep one
        // number type have it.
        Some(Value::Number(n)) => match n.as_i64().or_else(|| whole(n.as_f64())) {
            Some(a) if (1..=MAX_AMOUNT).contains(&a) => Some(a),
            _ => {
                errors.push(FieldError::new(
                    "amount",
                    format!("must be a whole number of minor units from 1 to {MAX_AMOUNT}"),
                ));
                None
            }
        },
        Some(_) => {
            errors.push(FieldError::new("amount", "must be an integer"));
            None
        }
        None => {
            errors.push(FieldError::new("amount", "is required"));
            None
        }
    };
    let currency = match take_string(&mut fields, "currency", &mut errors, true) {
        Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            let lower = c.to_ascii_lowercase();
            if ISO_4217.split(' ').any(|code| code == lower) {
                Some(lower)
            } else {
                errors.push(FieldError::new(
                    "currency",
                    format!("`{c}` is not an ISO 4217 currency code"),
                ));
                None
            }
        }
        Some(_) => {
            errors.push(FieldError::new(
                "currency",
                "must be a three-letter ISO 4217 code",
            ));
            None
        }
        None => None,
    };
    let source = match take_string(&mut fields, "source", &mut errors, true) {
        Some(s) if (1..=255).contains(&s.chars().count()) => Some(s),
        Some(_) => {
            errors.push(FieldError::new("source", "must be 1 to 255 characters"));
            None
        }
        None => None,
    };
    let description = match take_string(&mut fields, "description", &mut errors, false) {
        Some(d) if d.chars().count() > 500 => {
            errors.push(FieldError::new(
                "description",
                "must be at most 500 characters",
            ));
            None
        }
        other => other,
    };
    let mut unknown: Vec<&String> = fields.keys().collect();
    unknown.sort();
    for name in unknown {
        errors.push(FieldError::new(name, "unknown field"));
    }
    match (amount, currency, source) {
        (Some(amount), Some(currency), Some(source)) if errors.is_empty() => Ok(NewPayment {
            amount,
            currency,
            source,
            description,
        }),
        _ => Err(ApiError::InvalidRequest {
            detail: format!(
                "{} field{} invalid: {}",
                errors.len(),
                if errors.len() == 1 { " is" } else { "s are" },
                errors
                    .iter()
                    .map(|e| e.field.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            errors,
        }),
    }
}

/// `f` as an integer when it has no fractional part and is within the amounts' range (so the
/// conversion is exact).
fn whole(f: Option<f64>) -> Option<i64> {
    f.filter(|f| f.fract() == 0.0 && (0.0..=MAX_AMOUNT as f64).contains(f))
        .map(|f| f as i64)
}

fn take_string(
    fields: &mut Map<String, Value>,
    name: &str,
    errors: &mut Vec<FieldError>,
    required: bool,
) -> Option<String> {
    match fields.remove(name) {
        Some(Value::String(s)) => Some(s),
        Some(Value::Null) | None if !required => None,
        None => {
            errors.push(FieldError::new(name, "is required"));
            None
        }
        Some(_) => {
            errors.push(FieldError::new(name, "must be a string"));
            None
        }
    }
}

/// Active ISO 4217 currency codes.
const ISO_4217: &str = "aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd \
bob bov brl bsd btn bwp byn bzd cad cdf che chf chw clf clp cny cop cou crc cuc cup cve czk djf \
dkk dop dzd egp ern etb eur fjd fkp gbp gel ghs gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr \
iqd irr isk jmd jod jpy kes kgs khr kmf kpw krw kwd kyd kzt lak lbp lkr lrd lsl lyd mad mdl mga \
mkd mmk mnt mop mru mur mvr mwk mxn mxv myr mzn nad ngn nio nok npr nzd omr pab pen pgk php pkr \
pln pyg qar ron rsd rub rwf sar sbd scr sdg sek sgd shp sle sll sos srd ssp stn svc syp szl thb \
tjs tmt tnd top try ttd twd tzs uah ugx usd usn uyi uyu uyw uzs ved ves vnd vuv wst xaf xag xau \
xcd xcg xdr xof xpd xpf xpt xsu xua yer zar zmw zwg zwl";

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(body: &str) -> Vec<String> {
        match parse_new_payment(body.as_bytes()) {
            Err(ApiError::InvalidRequest { errors, .. }) => {
                errors.into_iter().map(|e| e.field).collect()
            }
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_body_is_normalized() {
        let p = parse_new_payment(
            br#"{"amount":1999,"currency":"USD","source":"tok_visa","description":null}"#,
        )
        .unwrap();
        assert_eq!(p.currency, "usd");
        assert_eq!(p.amount, 1999);
        assert_eq!(p.description, None);
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(
            errors_of(r#"{"amount":0,"currency":"usd","source":"x"}"#),
            ["amount"]
        );
        assert_eq!(
            errors_of(r#"{"amount":100000000,"currency":"usd","source":"x"}"#),
            ["amount"]
        );
        assert_eq!(
            errors_of(r#"{"amount":1.5,"currency":"usd","source":"x"}"#),
            ["amount"]
        );
        assert_eq!(
            errors_of(r#"{"amount":"5","currency":"usd","source":"x"}"#),
            ["amount"]
        );
        for whole in ["1999.0", "1.999e3", "19990e-1"] {
            let body = format!(r#"{{"amount":{whole},"currency":"usd","source":"x"}}"#);
            assert_eq!(
                parse_new_payment(body.as_bytes()).unwrap().amount,
                1999,
                "{whole}"
            );
        }
        assert_eq!(
            errors_of(r#"{"amount":1e300,"currency":"usd","source":"x"}"#),
            ["amount"]
        );
        assert_eq!(
            errors_of(r#"{"amount":5,"currency":"zzz","source":"x"}"#),
            ["currency"]
        );
        assert_eq!(
            errors_of(r#"{"amount":5,"currency":"us","source":"x"}"#),
            ["currency"]
        );
        assert_eq!(
            errors_of(r#"{"amount":5,"currency":"usd","source":""}"#),
            ["source"]
        );
        assert_eq!(
            errors_of(r#"{"amount":5,"currency":"usd","source":"x","tip":1}"#),
            ["tip"]
        );
        let long = "d".repeat(501);
        assert_eq!(
            errors_of(&format!(
                r#"{{"amount":5,"currency":"usd","source":"x","description":"{long}"}}"#
            )),
            ["description"]
        );
        assert_eq!(errors_of("{}"), ["amount", "currency", "source"]);
    }

    #[test]
    fn malformed_json_is_named_as_such() {
        match parse_new_payment(b"{\"amount\":") {
            Err(ApiError::InvalidRequest { detail, .. }) => {
                assert!(detail.contains("not valid JSON"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        for not_an_object in [&b"[1]"[..], b"7", b"\"x\"", b"null"] {
            match parse_new_payment(not_an_object) {
                Err(ApiError::InvalidRequest { detail, .. }) => {
                    assert!(detail.contains("must be a JSON object"), "{detail}")
                }
                other => panic!("{other:?}"),
            }
        }
        match parse_new_payment(b"{\"amount\":1} trailing") {
            Err(ApiError::InvalidRequest { detail, .. }) => {
                assert!(detail.contains("not valid JSON"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_duplicate_key_is_named_not_silently_overwritten() {
        assert_eq!(
            errors_of(r#"{"amount":1,"amount":777,"currency":"usd","source":"x"}"#),
            ["amount"]
        );
        match parse_new_payment(
            br#"{"amount":1,"currency":"usd","source":"x","source":"y","source":"z"}"#,
        ) {
            Err(ApiError::InvalidRequest { detail, errors }) => {
                assert_eq!(errors.len(), 1, "{errors:?}");
                assert_eq!(errors[0].field, "source");
                assert!(errors[0].message.contains("more than once"));
                assert!(detail.contains("source"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // Nested objects are values like any other: only the body's own members count.
        assert_eq!(
            errors_of(r#"{"amount":1,"currency":"usd","source":"x","tip":{"a":1,"a":2}}"#),
            ["tip"]
        );
        assert!(parse_new_payment(br#"{"amount":1,"currency":"usd","source":"x"}"#).is_ok());
    }

    #[test]
    fn quoted_keys_unescape() {
        assert_eq!(unescape_sf_string(r#"a\"b\\c"#).as_deref(), Some("a\"b\\c"));
        assert_eq!(unescape_sf_string(r#"a\nb"#), None);
        assert_eq!(unescape_sf_string(r#"a"b"#), None);
    }
}
