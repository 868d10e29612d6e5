//! Delivery policies (`config/policies.toml`): per item kind, the channels an item goes
//! through and when, and the rules that make it legally served. The policy id and version are
//! written into every evidence record the policy drives, and what a policy decided for an item
//! (its steps, their timers, deemed service) is fixed on the item at submission.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};

use crate::channels::KNOWN_CHANNELS;
use crate::domain::Kind;

/// A span of time written as `90s`, `30m`, `72h`, `10d` or a sum of them (`1d12h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub chrono::Duration);

impl Span {
    pub fn parse(text: &str) -> Result<Span, String> {
        let t = text.trim();
        let bad = || format!("{text:?} is not a duration such as 90s, 30m, 72h, 10d or 1d12h");
        if t.is_empty() {
            return Err(bad());
        }
        let mut total = chrono::Duration::zero();
        let mut digits = String::new();
        let mut chars = t.chars().peekable();
        while let Some(c) = chars.next() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let n: i64 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            let unit = if c == 'm' && chars.peek() == Some(&'s') {
                chars.next();
                chrono::Duration::milliseconds(n)
            } else {
                match c {
                    's' => chrono::Duration::seconds(n),
                    'm' => chrono::Duration::minutes(n),
                    'h' => chrono::Duration::hours(n),
                    'd' => chrono::Duration::days(n),
                    _ => return Err(bad()),
                }
            };
            total += unit;
        }
        if !digits.is_empty() {
            return Err(bad());
        }
        Ok(Span(total))
    }

    /// Back to the short form (`3d`, `72h`, `1d12h`), as policies and evidence write it.
    pub fn text(self) -> String {
        let mut ms = self.0.num_milliseconds();
        if ms == 0 {
            return "0s".into();
        }
        let mut out = String::new();
        for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)] {
            if ms >= size {
                out.push_str(&format!("{}{unit}", ms / size));
                ms %= size;
            }
        }
        out
    }

    /// As a PostgreSQL interval literal.
    pub fn interval(self) -> String {
        format!("{} milliseconds", self.0.num_milliseconds())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
        let s = String::deserialize(d)?;
        Span::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub channel: String,
    /// When the step applies; by default always.
    #[serde(default)]
    pub when: When,
    /// Wait this long after submission before the step starts (an escalation).
    #[serde(default)]
    pub after: Option<Span>,
    /// A timed step is skipped when this holds by the time it is due.
    #[serde(default)]
    pub unless: Option<Unless>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    #[default]
    Always,
    /// Only for recipients who consented to digital delivery.
    DigitalConsent,
    /// Only for recipients who did not: they get paper.
    NoDigitalConsent,
}

/// What makes a timed step unnecessary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unless {
    /// The recipient opened the item in the inbox.
    Opened,
    /// The item was served, by any rule.
    Served,
}

impl Unless {
    pub fn as_str(self) -> &'static str {
        match self {
            Unless::Opened => "opened",
            Unless::Served => "served",
        }
    }

    pub fn parse(s: &str) -> Option<Unless> {
        match s {
            "opened" => Some(Unless::Opened),
            "served" => Some(Unless::Served),
            _ => None,
        }
    }
}

impl Step {
    pub fn applies(&self, digital_consent: bool) -> bool {
        match self.when {
            When::Always => true,
            When::DigitalConsent => digital_consent,
            When::NoDigitalConsent => !digital_consent,
        }
    }
}

/// Events that serve an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceRule {
    /// The recipient opened the item in the portal inbox.
    Accessed,
    /// The postman handed the letter to the addressee (or someone entitled to take it).
    PostalHandover,
    /// The addressee refused the letter at the door.
    Refused,
    /// Time passed after a confirmed inbox deposit (the policy's `deemed` rule).
    Deemed,
}

impl ServiceRule {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceRule::Accessed => "accessed",
            ServiceRule::PostalHandover => "postal_handover",
            ServiceRule::Refused => "refused",
            ServiceRule::Deemed => "deemed",
        }
    }
}

/// Deemed service: the item counts as served this long after its confirmed deposit in the
/// inbox of a recipient who consented to digital delivery, unless served earlier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deemed {
    pub after: Span,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(skip)]
    pub id: String,
    pub version: i32,
    pub steps: Vec<Step>,
    pub served_on: Vec<ServiceRule>,
    #[serde(default)]
    pub deemed: Option<Deemed>,
    /// How long a letter may take from hand-off to the addressee: counted when judging whether
    /// a `respond_by` leaves enough time.
    #[serde(default = "default_postal_transit")]
    pub postal_transit: Span,
}

fn default_postal_transit() -> Span {
    Span(chrono::Duration::days(5))
}

impl Policy {
    /// The steps for a recipient, with their position in the policy.
    pub fn steps_for(&self, digital_consent: bool) -> impl Iterator<Item = (usize, &Step)> {
        self.steps.iter().enumerate().filter(move |(_, s)| s.applies(digital_consent))
    }

    /// Deemed service for a recipient, when the policy has it: only with digital consent.
    pub fn deemed_for(&self, digital_consent: bool) -> Option<&Deemed> {
        self.deemed.as_ref().filter(|_| digital_consent)
    }

    /// How long the steps for this recipient may take to reach them at worst: the latest
    /// timed step, plus postal transit for a letter. A `respond_by` sooner than this leaves the
    /// recipient too little time.
    pub fn time_needed(&self, digital_consent: bool) -> (chrono::Duration, String) {
        let mut worst = (chrono::Duration::zero(), String::from("immediate digital delivery"));
        for (_, s) in self.steps_for(digital_consent) {
            let wait = s.after.map(|a| a.0).unwrap_or_default();
            let transit = if s.channel == "postal" { self.postal_transit.0 } else { chrono::Duration::zero() };
            if wait + transit > worst.0 {
                let mut why = String::new();
                if let Some(a) = s.after {
                    why.push_str(&format!("a {} step after {}", s.channel, a.text()));
                    if let Some(u) = s.unless {
                        why.push_str(&format!(" unless {}", u.as_str()));
                    }
                } else {
                    why.push_str(&format!("a {} step at once", s.channel));
                }
                if s.channel == "postal" {
                    why.push_str(&format!(", then up to {} in the post", self.postal_transit.text()));
                }
                worst = (wait + transit, why);
            }
        }
        worst
    }

    /// The warning for a `respond_by` that leaves too little time, if it does.
    pub fn respond_by_warning(
        &self,
        digital_consent: bool,
        now: DateTime<Utc>,
        respond_by: DateTime<Utc>,
    ) -> Option<String> {
        let (needed, why) = self.time_needed(digital_consent);
        let ready = now + needed;
        (respond_by < ready).then(|| {
            format!(
                "respond_by leaves {} but policy {} v{} may need {} to reach the recipient ({why}): \
                 the recipient may learn of the item only after {}",
                Span(respond_by - now).text_rounded(),
                self.id,
                self.version,
                Span(needed).text(),
                crate::templates::local_time(ready),
            )
        })
    }
}

impl Span {
    /// Rounded to minutes for people.
    fn text_rounded(self) -> String {
        Span(chrono::Duration::minutes(self.0.num_minutes().max(0))).text()
    }
}

#[derive(Debug, Clone)]
pub struct Policies {
    by_kind: HashMap<Kind, Policy>,
}

impl Policies {
    pub fn load(path: &Path) -> anyhow::Result<Policies> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Policies> {
        let raw: HashMap<String, Policy> = toml::from_str(text)?;
        let mut by_kind = HashMap::new();
        for (name, mut policy) in raw {
            let kind = Kind::parse(&name).map_err(|_| anyhow::anyhow!("[{name}] is not an item kind"))?;
            anyhow::ensure!(!policy.steps.is_empty(), "[{name}] has no steps");
            anyhow::ensure!(policy.version >= 1, "[{name}] version must be 1 or more");
            for step in &policy.steps {
                anyhow::ensure!(
                    KNOWN_CHANNELS.contains(&step.channel.as_str()),
                    "[{name}] names unknown channel {:?}",
                    step.channel
                );
                anyhow::ensure!(
                    step.unless.is_none() || step.after.is_some(),
                    "[{name}] a {} step has `unless` without `after`: only a timed step can be skipped",
                    step.channel
                );
                if let Some(a) = step.after {
                    anyhow::ensure!(a.0 > chrono::Duration::zero(), "[{name}] `after` must be longer than zero");
                }
            }
            for consent in [true, false] {
                let mut seen = Vec::new();
                for (_, s) in policy.steps_for(consent) {
                    anyhow::ensure!(
                        !seen.contains(&s.channel),
                        "[{name}] channel {} appears twice for recipients {} digital consent",
                        s.channel,
                        if consent { "with" } else { "without" }
                    );
                    seen.push(s.channel.clone());
                }
                anyhow::ensure!(
                    policy
                        .steps_for(consent)
                        .any(|(_, s)| s.after.is_none() && matches!(s.channel.as_str(), "inbox" | "postal")),
                    "[{name}] recipients {} digital consent get no inbox deposit or letter at once",
                    if consent { "with" } else { "without" }
                );
            }
            if let Some(d) = &policy.deemed {
                anyhow::ensure!(d.after.0 > chrono::Duration::zero(), "[{name}] deemed.after must be longer than zero");
            }
            anyhow::ensure!(
                !policy.served_on.contains(&ServiceRule::Deemed),
                "[{name}] deemed service is configured with `deemed = {{ after = \"10d\" }}`, not in served_on"
            );
            policy.id = name;
            by_kind.insert(kind, policy);
        }
        for kind in Kind::ALL {
            anyhow::ensure!(by_kind.contains_key(&kind), "no policy for kind {}", kind.as_str());
        }
        Ok(Policies { by_kind })
    }

    pub fn for_kind(&self, kind: Kind) -> &Policy {
        &self.by_kind[&kind]
    }

    /// The policy an item was submitted under, by its recorded id. An item keeps the rules it
    /// was sent with; the version recorded says which.
    pub fn by_id(&self, id: &str) -> Option<&Policy> {
        self.by_kind.values().find(|p| p.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_policies_cover_every_kind() {
        let p = Policies::parse(include_str!("../config/policies.toml")).unwrap();
        let summons = p.for_kind(Kind::Summons);
        assert_eq!(summons.steps[0].channel, "inbox");
        // Consent: inbox + notices at once, a letter after 72 h unopened, deemed after 10 days.
        let escalation: Vec<_> = summons.steps_for(true).filter(|(_, s)| s.after.is_some()).collect();
        assert_eq!(escalation.len(), 1);
        assert_eq!(escalation[0].1.channel, "postal");
        assert_eq!(escalation[0].1.after, Some(Span(chrono::Duration::hours(72))));
        assert!(summons.deemed_for(true).is_some());
        // No consent: the letter at once, and no deemed service.
        assert!(summons.steps_for(false).any(|(_, s)| s.channel == "postal" && s.after.is_none()));
        assert!(summons.deemed_for(false).is_none());
    }

    #[test]
    fn unknown_channels_and_missing_kinds_are_refused() {
        assert!(Policies::parse("[summons]\nversion=1\nsteps=[{channel=\"fax\"}]\nserved_on=[]").is_err());
        assert!(Policies::parse("[summons]\nversion=1\nsteps=[{channel=\"inbox\"}]\nserved_on=[]").is_err());
    }

    #[test]
    fn bad_timers_are_refused_with_the_reason() {
        let base = include_str!("../config/policies.toml");
        let twice = base.replace(
            "{ channel = \"inbox\" }, { channel = \"sms\" }]",
            "{ channel = \"inbox\" }, { channel = \"sms\" }, { channel = \"sms\", after = \"1d\" }]",
        );
        assert!(format!("{:#}", Policies::parse(&twice).unwrap_err()).contains("appears twice"));
        let unless_alone = base.replace("{ channel = \"sms\" }]", "{ channel = \"sms\", unless = \"opened\" }]");
        assert!(format!("{:#}", Policies::parse(&unless_alone).unwrap_err()).contains("without `after`"));
        let bad_span = base.replace("after = \"72h\"", "after = \"72 hours\"");
        assert!(format!("{:#}", Policies::parse(&bad_span).unwrap_err()).contains("not a duration"));
    }

    #[test]
    fn spans_read_and_write_the_short_form() {
        assert_eq!(Span::parse("72h").unwrap().0, chrono::Duration::hours(72));
        assert_eq!(Span::parse("1d12h").unwrap().0, chrono::Duration::hours(36));
        assert_eq!(Span::parse("250ms").unwrap().0, chrono::Duration::milliseconds(250));
        assert_eq!(Span::parse("10d").unwrap().text(), "10d");
        assert_eq!(Span::parse("36h").unwrap().text(), "1d12h");
        for bad in ["", "h", "10", "3 days", "-1d", "1w"] {
            assert!(Span::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_respond_by_sooner_than_the_letter_is_flagged() {
        let p = Policies::parse(include_str!("../config/policies.toml")).unwrap();
        let summons = p.for_kind(Kind::Summons);
        let now = Utc::now();
        // With consent the letter may leave after 72 h and take 5 days: 8 days.
        let warning = summons.respond_by_warning(true, now, now + chrono::Duration::days(4)).unwrap();
        assert!(warning.contains("postal step after 3d unless opened"), "{warning}");
        assert!(summons.respond_by_warning(true, now, now + chrono::Duration::days(9)).is_none());
        // Without consent the letter leaves at once: 5 days.
        assert!(summons.respond_by_warning(false, now, now + chrono::Duration::days(6)).is_none());
        assert!(summons.respond_by_warning(false, now, now + chrono::Duration::days(4)).is_some());
    }
}
