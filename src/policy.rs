//! Delivery policies (`config/policies.toml`): per item kind, the channels an item goes
//! through and the events that make it legally served. The policy id and version are written
//! into every evidence record the policy drives.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::channels::KNOWN_CHANNELS;
use crate::domain::Kind;

#[derive(Debug, Clone, Deserialize)]
pub struct Step {
    pub channel: String,
    /// When the step applies; by default always.
    #[serde(default)]
    pub when: When,
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
}

impl ServiceRule {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceRule::Accessed => "accessed",
            ServiceRule::PostalHandover => "postal_handover",
            ServiceRule::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Policy {
    #[serde(skip)]
    pub id: String,
    pub version: i32,
    pub steps: Vec<Step>,
    pub served_on: Vec<ServiceRule>,
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
            for step in &policy.steps {
                anyhow::ensure!(
                    KNOWN_CHANNELS.contains(&step.channel.as_str()),
                    "[{name}] names unknown channel {:?}",
                    step.channel
                );
            }
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
        assert_eq!(p.for_kind(Kind::Summons).steps[0].channel, "inbox");
    }

    #[test]
    fn unknown_channels_and_missing_kinds_are_refused() {
        assert!(Policies::parse("[summons]\nversion=1\nsteps=[{channel=\"fax\"}]\nserved_on=[]").is_err());
        assert!(Policies::parse("[summons]\nversion=1\nsteps=[{channel=\"inbox\"}]\nserved_on=[]").is_err());
    }
}
