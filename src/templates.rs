//! Message templates: `templates/<name>/manifest.toml` declares the template's personalisation
//! variables and the kinds it serves; `templates/<name>/<language>.<part>.<ext>` holds its text.
//!
//! Content is rendered at submission and stored, so the digest in SubmissionAcceptance covers
//! exactly what the recipient will see. Rendering is strict: every variable used must be
//! provided, and HTML output is escaped.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context as _;
use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::{FieldError, Kind, Language};

/// The folder of the email notice layout, shared by every template.
const EMAIL_LAYOUT: &str = "_email";

/// Names the platform fills in itself; personalisation may not use them.
const RESERVED: [&str; 3] = ["agency", "recipient", "item"];
const MAX_VALUE_CHARS: usize = 5000;

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct Manifest {
    pub description: String,
    #[schema(value_type = Vec<String>)]
    pub kinds: Vec<Kind>,
    /// Variable name → what it is, with an example. Every one is required.
    pub variables: BTreeMap<String, String>,
    /// Languages the template is written in.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub languages: Vec<Language>,
}

pub struct Templates {
    env: Environment<'static>,
    manifests: BTreeMap<String, Manifest>,
}

/// What the platform adds to every rendering.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    pub agency: AgencyCtx,
    pub recipient: RecipientCtx,
    pub item: ItemCtx,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgencyCtx {
    pub name: String,
    pub code: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecipientCtx {
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemCtx {
    pub id: String,
    pub kind: String,
    pub reference: String,
    pub inbox_url: String,
    /// Local (Tashkent, UTC+5) date and time, `DD.MM.YYYY HH:MM`.
    pub respond_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Rendered {
    pub subject: String,
    pub html: String,
    /// The SMS notice (`<language>.sms.txt`): that an item waits, never its content.
    pub sms: Option<String>,
    /// The email notice, from the shared layout in `templates/_email/`.
    pub email: Option<EmailNotice>,
}

#[derive(Debug, Clone)]
pub struct EmailNotice {
    pub subject: String,
    pub text: String,
    pub html: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Input(#[from] FieldError),
    /// The template itself is broken: the platform's fault, not the caller's.
    #[error("template {0} failed: {1}")]
    Template(String, String),
}

impl Templates {
    pub fn load(dir: &Path) -> anyhow::Result<Templates> {
        let mut manifests = BTreeMap::new();
        let entries = std::fs::read_dir(dir).with_context(|| format!("reading templates from {}", dir.display()))?;
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let manifest_path = path.join("manifest.toml");
            if !manifest_path.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&manifest_path)?;
            let mut manifest: Manifest =
                toml::from_str(&text).with_context(|| format!("parsing {}", manifest_path.display()))?;
            for var in manifest.variables.keys() {
                anyhow::ensure!(!RESERVED.contains(&var.as_str()), "{name}: variable {var} is reserved");
            }
            manifest.languages = Language::ALL
                .into_iter()
                .filter(|l| path.join(format!("{}.subject.txt", l.as_str())).is_file())
                .filter(|l| path.join(format!("{}.inbox.html", l.as_str())).is_file())
                .collect();
            anyhow::ensure!(!manifest.languages.is_empty(), "{name}: no language has both subject and inbox files");
            manifests.insert(name, manifest);
        }
        anyhow::ensure!(!manifests.is_empty(), "no templates found in {}", dir.display());

        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_loader(minijinja::path_loader(dir));
        env.set_keep_trailing_newline(false);
        let templates = Templates { env, manifests };
        // Fail at start-up, not on the first submission, if a template does not parse.
        for (name, m) in &templates.manifests {
            for lang in &m.languages {
                for part in ["subject.txt", "inbox.html"] {
                    let file = format!("{name}/{}.{part}", lang.as_str());
                    templates.env.get_template(&file).with_context(|| format!("template {file}"))?;
                }
            }
        }
        Ok(templates)
    }

    fn has(&self, file: &str) -> bool {
        self.env.get_template(file).is_ok()
    }

    pub fn manifests(&self) -> &BTreeMap<String, Manifest> {
        &self.manifests
    }

    /// Checks the request against the template's manifest, then renders subject and content.
    pub fn render(
        &self,
        name: &str,
        language: Language,
        kind: Kind,
        personalisation: &Map<String, Value>,
        ctx: &Context,
    ) -> Result<Rendered, RenderError> {
        let manifest = self.manifests.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.manifests.keys().map(String::as_str).collect();
            FieldError::new("template", format!("unknown template; known: {}", known.join(", ")))
        })?;
        if !manifest.kinds.contains(&kind) {
            return Err(FieldError::new("kind", format!("template {name} is not for {}", kind.as_str())).into());
        }
        if !manifest.languages.contains(&language) {
            return Err(FieldError::new(
                "language",
                format!("template {name} is not written in {}", language.as_str()),
            )
            .into());
        }
        for var in manifest.variables.keys() {
            match personalisation.get(var) {
                None | Some(Value::Null) => {
                    return Err(FieldError::new(
                        format!("personalisation.{var}"),
                        format!("required by template {name}: {}", manifest.variables[var]),
                    )
                    .into())
                }
                Some(Value::String(s)) if s.trim().is_empty() => {
                    return Err(FieldError::new(format!("personalisation.{var}"), "must not be empty").into())
                }
                Some(Value::String(s)) if s.chars().count() > MAX_VALUE_CHARS => {
                    return Err(FieldError::new(
                        format!("personalisation.{var}"),
                        format!("at most {MAX_VALUE_CHARS} characters"),
                    )
                    .into())
                }
                Some(Value::String(_) | Value::Number(_) | Value::Bool(_)) => {}
                Some(_) => {
                    return Err(FieldError::new(format!("personalisation.{var}"), "must be a string or a number").into())
                }
            }
        }
        if let Some(extra) = personalisation.keys().find(|k| !manifest.variables.contains_key(*k)) {
            return Err(FieldError::new(
                format!("personalisation.{extra}"),
                format!("template {name} has no such variable"),
            )
            .into());
        }

        let mut vars: HashMap<String, minijinja::Value> =
            personalisation.iter().map(|(k, v)| (k.clone(), minijinja::Value::from_serialize(v))).collect();
        vars.insert("agency".into(), minijinja::Value::from_serialize(&ctx.agency));
        vars.insert("recipient".into(), minijinja::Value::from_serialize(&ctx.recipient));
        vars.insert("item".into(), minijinja::Value::from_serialize(&ctx.item));

        let render = |part: &str| -> Result<String, RenderError> {
            let file = format!("{name}/{}.{part}", language.as_str());
            self.env
                .get_template(&file)
                .and_then(|t| t.render(&vars))
                .map_err(|e| RenderError::Template(file.clone(), format!("{e:#}")))
        };
        let subject = render("subject.txt")?.trim().to_string();
        let html = render("inbox.html")?;
        let sms = if self.has(&format!("{name}/{}.sms.txt", language.as_str())) {
            Some(render("sms.txt")?.trim().to_string())
        } else {
            None
        };
        let email = if self.has(&format!("{EMAIL_LAYOUT}/{}.txt", language.as_str())) {
            let layout = |part: &str| -> Result<String, RenderError> {
                let file = format!("{EMAIL_LAYOUT}/{}.{part}", language.as_str());
                self.env
                    .get_template(&file)
                    .and_then(|t| t.render(&vars))
                    .map_err(|e| RenderError::Template(file.clone(), format!("{e:#}")))
            };
            Some(EmailNotice {
                subject: layout("subject.txt")?.trim().to_string(),
                text: layout("txt")?,
                html: layout("html")?,
            })
        } else {
            None
        };
        Ok(Rendered { subject, html, sms, email })
    }
}

/// `DD.MM.YYYY HH:MM` in Tashkent time (UTC+5, no daylight saving).
pub fn local_time(t: chrono::DateTime<chrono::Utc>) -> String {
    let tashkent = chrono::FixedOffset::east_opt(5 * 3600).expect("valid offset");
    t.with_timezone(&tashkent).format("%d.%m.%Y %H:%M").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            agency: AgencyCtx { name: "Yunusobod sudi".into(), code: "yunusobod-court".into() },
            recipient: RecipientCtx { name: "Aliyev Aziz".into() },
            item: ItemCtx {
                id: "01a2207b-6511-778e-a968-f3c5858a10e4".into(),
                kind: "summons".into(),
                reference: "2-1234/2026".into(),
                inbox_url: "https://dalil.example/inbox/1".into(),
                respond_by: Some("05.12.2026 10:00".into()),
            },
        }
    }

    #[test]
    fn every_shipped_template_renders_in_every_language_for_every_kind() {
        let t = Templates::load(Path::new("templates")).unwrap();
        assert!(t.manifests().contains_key("court-summons") && t.manifests().contains_key("tax-notice"));
        for (name, m) in t.manifests() {
            assert_eq!(m.languages.len(), 4, "{name} must exist in uz-Latn, uz-Cyrl, ru and en");
            let vars: Map<String, Value> =
                m.variables.keys().map(|k| (k.clone(), Value::String(format!("<{k}>")))).collect();
            for lang in &m.languages {
                for kind in &m.kinds {
                    let r = t.render(name, *lang, *kind, &vars, &ctx()).unwrap();
                    assert!(!r.subject.is_empty() && !r.subject.contains('\n'), "{name} {lang:?}: one-line subject");
                    assert!(r.html.contains("2-1234"), "{name} {lang:?}: the reference is shown");
                    // Every declared variable is used, and escaped in HTML.
                    for k in m.variables.keys() {
                        assert!(
                            r.html.contains(&format!("&lt;{k}&gt;")) || r.subject.contains(&format!("<{k}>")),
                            "{name} {lang:?}: {k} declared but not shown"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_shipped_sms_notice_fits_three_segments_with_a_real_court_name() {
        let t = Templates::load(Path::new("templates")).unwrap();
        let names = [
            (Language::UzLatn, "Toshkent shahar Yunusobod tumanlararo fuqarolik ishlari sudi"),
            (Language::UzCyrl, "Тошкент шаҳар Юнусобод туманлараро фуқаролик ишлари суди"),
            (Language::Ru, "Юнусабадский межрайонный суд по гражданским делам г. Ташкента"),
            (Language::En, "Yunusobod Inter-District Civil Court of Tashkent"),
        ];
        for (name, m) in t.manifests() {
            let vars: Map<String, Value> = m.variables.keys().map(|k| (k.clone(), Value::String("x".into()))).collect();
            for (lang, agency) in names {
                let mut c = ctx();
                c.agency.name = agency.into();
                c.item.inbox_url = format!("https://my.dalil.uz/inbox/{}", c.item.id);
                let r = t.render(name, lang, m.kinds[0], &vars, &c).unwrap();
                let sms = crate::sms::encode(r.sms.as_deref().expect("every template has an SMS notice"));
                println!(
                    "{name} {}: {} segment(s), {}, {} units",
                    lang.as_str(),
                    sms.segments,
                    sms.encoding.as_str(),
                    sms.units
                );
                assert!(sms.segments <= 3, "{name} {lang:?} takes {} segments", sms.segments);
                if matches!(lang, Language::UzLatn | Language::En) {
                    assert_eq!(sms.encoding, crate::sms::Encoding::Gsm7, "{name} {lang:?} should stay GSM-7");
                }
            }
        }
    }

    #[test]
    fn uzbek_latin_templates_use_the_proper_apostrophes() {
        for entry in std::fs::read_dir("templates").unwrap() {
            let dir = entry.unwrap().path();
            for file in std::fs::read_dir(&dir).unwrap() {
                let path = file.unwrap().path();
                if path.file_name().unwrap().to_string_lossy().starts_with("uz-Latn") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    // oʻ and gʻ take U+02BB; a plain ' or a curly quote after o/g is a typo.
                    for bad in ["o'", "g'", "o‘", "g‘", "o’", "g’", "O'", "G'"] {
                        assert!(!text.contains(bad), "{}: {bad:?}", path.display());
                    }
                }
            }
        }
    }
}
