//! SMS text: encoding and segment counting (GSM 03.38 7-bit or UCS-2), and the normalisation
//! of Uzbek Latin apostrophes so that Latin text stays in the cheaper GSM-7 alphabet.
//!
//! GSM-7 carries 160 characters in one message and 153 per part when split; the characters of
//! the extension table (`^{}[]~\|€`, form feed) take two. One character outside GSM-7 makes the
//! whole message UCS-2: 70 UTF-16 units, then 67 per part. Cyrillic is always UCS-2.

use serde::Serialize;

const GSM_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
const GSM_EXTENDED: &str = "^{}\\[~]|€\u{000C}";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "gsm-7",
            Encoding::Ucs2 => "ucs-2",
        }
    }
}

/// A message as it will be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Encoded {
    pub text: String,
    pub encoding: Encoding,
    /// Septets (GSM-7) or UTF-16 units (UCS-2).
    pub units: usize,
    pub segments: usize,
}

/// The apostrophes people and templates use for oʻ, gʻ and the tutuq belgisi.
const APOSTROPHES: [char; 6] = ['\u{02BB}', '\u{02BC}', '\u{2018}', '\u{2019}', '`', '\u{00B4}'];

fn gsm_units(text: &str) -> Option<usize> {
    text.chars().try_fold(0usize, |n, c| {
        if GSM_BASIC.contains(c) {
            Some(n + 1)
        } else if GSM_EXTENDED.contains(c) {
            Some(n + 2)
        } else {
            None
        }
    })
}

/// Chooses the cheapest faithful encoding. Uzbek Latin apostrophes become the GSM apostrophe
/// when that makes the whole text GSM-7; otherwise the text is sent untouched as UCS-2.
pub fn encode(text: &str) -> Encoded {
    let normalised: String = text.chars().map(|c| if APOSTROPHES.contains(&c) { '\'' } else { c }).collect();
    if let Some(units) = gsm_units(&normalised) {
        let segments = if units <= 160 { 1 } else { units.div_ceil(153) };
        return Encoded { text: normalised, encoding: Encoding::Gsm7, units, segments };
    }
    let units = text.encode_utf16().count();
    let segments = if units <= 70 { 1 } else { units.div_ceil(67) };
    Encoded { text: text.to_string(), encoding: Encoding::Ucs2, units, segments }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin_text_is_gsm7_with_160_then_153_per_part() {
        assert_eq!(encode(&"a".repeat(160)).segments, 1);
        assert_eq!(encode(&"a".repeat(161)).segments, 2);
        assert_eq!(encode(&"a".repeat(306)).segments, 2);
        assert_eq!(encode(&"a".repeat(307)).segments, 3);
    }

    #[test]
    fn extension_characters_count_twice() {
        let e = encode(&format!("{}€", "a".repeat(158)));
        assert_eq!((e.encoding, e.units, e.segments), (Encoding::Gsm7, 160, 1));
        assert_eq!(encode(&format!("{}[]", "a".repeat(157))).segments, 2);
    }

    #[test]
    fn uzbek_latin_apostrophes_are_normalised_to_stay_gsm7() {
        let e = encode("Toshkent shahar sudi: chaqiruv qogʻozi, maʼlumot uchun o‘qing");
        assert_eq!(e.encoding, Encoding::Gsm7);
        assert_eq!(e.text, "Toshkent shahar sudi: chaqiruv qog'ozi, ma'lumot uchun o'qing");
    }

    #[test]
    fn cyrillic_is_ucs2_with_70_then_67_per_part() {
        let e = encode("Суд направляет вам повестку");
        assert_eq!(e.encoding, Encoding::Ucs2);
        assert_eq!(encode(&"ў".repeat(70)).segments, 1);
        assert_eq!(encode(&"ў".repeat(71)).segments, 2);
        assert_eq!(encode(&"қ".repeat(135)).segments, 3);
        // Cyrillic text keeps its own apostrophes: it is UCS-2 anyway.
        assert!(encode("Ўзбекистонʼ").text.contains('ʼ'));
    }
}
