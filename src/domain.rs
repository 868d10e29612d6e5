//! Domain types, parsed at the edge: after parsing, nothing downstream takes a raw string
//! that means an identifier, a phone number or an address.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a value was refused, and where it was: the API turns this into a problem document
/// naming `field`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }

    /// The same error, one level deeper: `recipient` + `pinfl` → `recipient.pinfl`.
    pub fn under(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() { parent.into() } else { format!("{parent}.{}", self.field) };
        self
    }
}

/// Personal identification number of a natural person: 14 digits, the last a check digit
/// (Σ digit × 7,3,1,7,3,1,… over the first 13, mod 10).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Pinfl(String);

impl Pinfl {
    pub fn parse(raw: &str) -> Result<Pinfl, FieldError> {
        let s = raw.trim();
        if s.len() != 14 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FieldError::new("pinfl", "a PINFL is exactly 14 digits"));
        }
        let digits: Vec<u32> = s.bytes().map(|b| (b - b'0') as u32).collect();
        if digits[13] != Self::check_digit(&digits[..13]) {
            return Err(FieldError::new("pinfl", "the PINFL's check digit does not match"));
        }
        Ok(Pinfl(s.to_string()))
    }

    pub fn check_digit(first13: &[u32]) -> u32 {
        const WEIGHTS: [u32; 3] = [7, 3, 1];
        first13.iter().enumerate().map(|(i, d)| d * WEIGHTS[i % 3]).sum::<u32>() % 10
    }

    /// Completes 13 digits with their check digit (tests and demos).
    pub fn with_check_digit(first13: &str) -> Pinfl {
        let digits: Vec<u32> = first13.bytes().map(|b| (b - b'0') as u32).collect();
        assert_eq!(digits.len(), 13, "13 digits expected");
        Pinfl(format!("{first13}{}", Self::check_digit(&digits)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Pinfl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Taxpayer identification number (STIR): 9 digits. The check algorithm is not public, so
/// only the form is checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Tin(String);

impl Tin {
    pub fn parse(raw: &str) -> Result<Tin, FieldError> {
        let s = raw.trim();
        if s.len() != 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FieldError::new("tin", "a TIN is exactly 9 digits"));
        }
        if s.starts_with('0') {
            return Err(FieldError::new("tin", "a TIN does not start with 0"));
        }
        Ok(Tin(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who an item is addressed to: a person by PINFL or a legal entity by TIN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecipientId {
    Pinfl(Pinfl),
    Tin(Tin),
}

impl RecipientId {
    /// From the API's `{"pinfl": "…"}` or `{"tin": "…"}` (exactly one).
    pub fn from_parts(pinfl: Option<&str>, tin: Option<&str>) -> Result<RecipientId, FieldError> {
        match (pinfl, tin) {
            (Some(p), None) => Ok(RecipientId::Pinfl(Pinfl::parse(p)?)),
            (None, Some(t)) => Ok(RecipientId::Tin(Tin::parse(t)?)),
            (Some(_), Some(_)) => Err(FieldError::new("", "give either pinfl or tin, not both")),
            (None, None) => Err(FieldError::new("", "give the recipient's pinfl or tin")),
        }
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            RecipientId::Pinfl(_) => "pinfl",
            RecipientId::Tin(_) => "tin",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            RecipientId::Pinfl(p) => p.as_str(),
            RecipientId::Tin(t) => t.as_str(),
        }
    }
}

/// `{"pinfl": …}` or `{"tin": …}` from a recipient row's two columns, as the API and the
/// evidence show it.
pub fn recipient_json(pinfl: Option<&str>, tin: Option<&str>) -> serde_json::Value {
    match (pinfl, tin) {
        (Some(p), _) => serde_json::json!({ "pinfl": p }),
        (_, Some(t)) => serde_json::json!({ "tin": t }),
        _ => serde_json::Value::Null,
    }
}

/// A phone number in E.164, checked against libphonenumber's metadata (Uzbek numbers are
/// +998 and nine digits of a real operator range).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn parse(raw: &str) -> Result<PhoneNumber, FieldError> {
        let err = || FieldError::new("phone", "not a valid phone number in E.164 form, e.g. +998901234567");
        let trimmed = raw.trim();
        if !trimmed.starts_with('+') {
            return Err(err());
        }
        let number = phonenumber::parse(None, trimmed).map_err(|_| err())?;
        if !phonenumber::is_valid(&number) {
            return Err(err());
        }
        Ok(PhoneNumber(number.format().mode(phonenumber::Mode::E164).to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An email address: one `@`, a non-empty local part, a domain with a dot, no spaces, at most
/// 254 characters. Deliverability is the mail server's to judge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(raw: &str) -> Result<EmailAddress, FieldError> {
        let s = raw.trim();
        let err = || FieldError::new("email", "not a valid email address");
        if s.len() > 254 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err());
        }
        let (local, domain) = s.rsplit_once('@').ok_or_else(err)?;
        if local.is_empty() || local.len() > 64 || local.contains('@') {
            return Err(err());
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2
            || labels.iter().any(|l| l.is_empty() || l.starts_with('-') || l.ends_with('-'))
            || !domain.chars().all(|c| c.is_alphanumeric() || c == '-' || c == '.')
        {
            return Err(err());
        }
        Ok(EmailAddress(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The regions of Uzbekistan by their ISO 3166-2 codes; postal operators cover regions.
pub const REGIONS: [(&str, &str); 14] = [
    ("UZ-TK", "Toshkent shahri"),
    ("UZ-TO", "Toshkent viloyati"),
    ("UZ-AN", "Andijon viloyati"),
    ("UZ-BU", "Buxoro viloyati"),
    ("UZ-FA", "Fargʻona viloyati"),
    ("UZ-JI", "Jizzax viloyati"),
    ("UZ-XO", "Xorazm viloyati"),
    ("UZ-NG", "Namangan viloyati"),
    ("UZ-NW", "Navoiy viloyati"),
    ("UZ-QA", "Qashqadaryo viloyati"),
    ("UZ-QR", "Qoraqalpogʻiston Respublikasi"),
    ("UZ-SA", "Samarqand viloyati"),
    ("UZ-SI", "Sirdaryo viloyati"),
    ("UZ-SU", "Surxondaryo viloyati"),
];

/// A postal address in Uzbekistan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PostalAddress {
    /// ISO 3166-2 region code, e.g. `UZ-TK` (Tashkent city).
    pub region: String,
    pub district: String,
    pub street: String,
    pub house: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apartment: Option<String>,
    /// Six digits, e.g. `100084`.
    pub postcode: String,
}

impl PostalAddress {
    /// Checks and tidies an address as given.
    pub fn parse(raw: PostalAddress) -> Result<PostalAddress, FieldError> {
        let region = raw.region.trim().to_ascii_uppercase();
        if !REGIONS.iter().any(|(code, _)| *code == region) {
            return Err(FieldError::new("address.region", "not a region code of Uzbekistan (UZ-TK, UZ-SA, …)"));
        }
        let need = |name: &str, v: &str| -> Result<String, FieldError> {
            let v = v.trim();
            if v.is_empty() || v.chars().count() > 200 {
                return Err(FieldError::new(format!("address.{name}"), "required, at most 200 characters"));
            }
            Ok(v.to_string())
        };
        let postcode = raw.postcode.trim().to_string();
        if postcode.len() != 6 || !postcode.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FieldError::new("address.postcode", "a postcode is 6 digits"));
        }
        Ok(PostalAddress {
            region,
            district: need("district", &raw.district)?,
            street: need("street", &raw.street)?,
            house: need("house", &raw.house)?,
            apartment: match raw.apartment.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(a) => Some(need("apartment", a)?),
            },
            postcode,
        })
    }
}

/// What an item is, which picks its delivery policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Notification,
    Summons,
    Decision,
    Letter,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Notification, Kind::Summons, Kind::Decision, Kind::Letter];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Notification => "notification",
            Kind::Summons => "summons",
            Kind::Decision => "decision",
            Kind::Letter => "letter",
        }
    }

    pub fn parse(s: &str) -> Result<Kind, FieldError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| FieldError::new("kind", "one of notification, summons, decision, letter"))
    }
}

/// Which delivery queues an item travels in (DESIGN invariant 5). Each channel has a queue per
/// lane and workers consume both at once, so a flood in the bulk lane (a batch of thousands)
/// never stands ahead of an item sent on its own in the standard lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Lane {
    #[default]
    Standard,
    Bulk,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Standard => "standard",
            Lane::Bulk => "bulk",
        }
    }

    /// The routing key of a channel's work in this lane: `sms`, `sms.bulk`.
    pub fn routing_key(self, channel: &str) -> String {
        match self {
            Lane::Standard => channel.to_string(),
            Lane::Bulk => format!("{channel}.bulk"),
        }
    }
}

/// Languages that templates are written in (BCP 47 tags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Language {
    #[serde(rename = "uz-Latn")]
    UzLatn,
    #[serde(rename = "uz-Cyrl")]
    UzCyrl,
    #[serde(rename = "ru")]
    Ru,
    #[serde(rename = "en")]
    En,
}

impl Language {
    pub const ALL: [Language; 4] = [Language::UzLatn, Language::UzCyrl, Language::Ru, Language::En];

    pub fn as_str(self) -> &'static str {
        match self {
            Language::UzLatn => "uz-Latn",
            Language::UzCyrl => "uz-Cyrl",
            Language::Ru => "ru",
            Language::En => "en",
        }
    }

    pub fn parse(s: &str) -> Result<Language, FieldError> {
        Language::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| FieldError::new("language", "one of uz-Latn, uz-Cyrl, ru, en"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinfl_needs_fourteen_digits_and_a_matching_check_digit() {
        let good = Pinfl::with_check_digit("3120588010012");
        assert!(Pinfl::parse(good.as_str()).is_ok());
        let mut bad = good.as_str().to_string();
        let last = bad.pop().unwrap().to_digit(10).unwrap();
        bad.push(char::from_digit((last + 1) % 10, 10).unwrap());
        assert_eq!(Pinfl::parse(&bad).unwrap_err().message, "the PINFL's check digit does not match");
        assert!(Pinfl::parse("1234").is_err());
        assert!(Pinfl::parse("3120588010012a").is_err());
    }

    #[test]
    fn tin_is_nine_digits() {
        assert!(Tin::parse("301234567").is_ok());
        assert!(Tin::parse("30123456").is_err());
        assert!(Tin::parse("012345678").is_err());
    }

    #[test]
    fn uzbek_mobile_numbers_are_valid_and_normalised() {
        assert_eq!(PhoneNumber::parse("+998 90 123 45 67").unwrap().as_str(), "+998901234567");
        assert!(PhoneNumber::parse("+99812").is_err());
        assert!(PhoneNumber::parse("901234567").is_err());
        assert!(PhoneNumber::parse("+998001234567").is_err());
    }

    #[test]
    fn email_addresses() {
        assert!(EmailAddress::parse("aziz@example.uz").is_ok());
        for bad in ["aziz", "@example.uz", "aziz@", "aziz@example", "a b@example.uz", "a@-x.uz"] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_need_a_known_region_and_a_six_digit_postcode() {
        let a = PostalAddress {
            region: "uz-tk".into(),
            district: "Yunusobod".into(),
            street: "Amir Temur".into(),
            house: "12".into(),
            apartment: Some(" ".into()),
            postcode: "100084".into(),
        };
        let parsed = PostalAddress::parse(a.clone()).unwrap();
        assert_eq!(parsed.region, "UZ-TK");
        assert_eq!(parsed.apartment, None);
        assert_eq!(
            PostalAddress::parse(PostalAddress { region: "UZ-ZZ".into(), ..a.clone() }).unwrap_err().field,
            "address.region"
        );
        assert_eq!(
            PostalAddress::parse(PostalAddress { postcode: "1000".into(), ..a }).unwrap_err().field,
            "address.postcode"
        );
    }
}
