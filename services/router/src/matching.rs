//! The request-side conditions shared by review policies ([`crate::review`]) and routing rules
//! ([`crate::rules`]): `prompt_keywords`, `prompt_regex` and the "is one of this list" tests
//! (`tenants`, `models`, `routes`, `plans`, `quality`). One matcher, so a keyword means the same
//! thing to a review policy and to a routing rule.
//!
//! The "prompt" is the text of the request's own `messages`, one per line ([`prompt_text`]), not
//! the session history it continues. Keywords are case-insensitive substrings; a regex uses the
//! regex crate's syntax and is compiled once at start-up.

use regex::Regex;
use weir_mesh::config::ConfigError;
use weir_proto::common::Message;

/// `prompt_keywords` and `prompt_regex`, compiled: holds when every one given holds (any keyword,
/// and the regex), and always when neither is given.
#[derive(Debug, Clone, Default)]
pub struct PromptMatch {
    /// Lower-cased.
    keywords: Vec<String>,
    regex: Option<Regex>,
}

impl PromptMatch {
    /// Compiles `keywords` and `regex`; `key` names a field for errors (`prompt_keywords`,
    /// `prompt_regex`): an empty keyword or a regex that does not compile is refused.
    pub fn new(
        key: &dyn Fn(&str) -> String,
        keywords: &[String],
        regex: Option<&str>,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            keywords: compile_keywords(&key("prompt_keywords"), keywords)?,
            regex: compile_regex(&key("prompt_regex"), regex)?,
        })
    }

    /// Whether neither keywords nor a regex were given (the match always holds).
    pub fn is_empty(&self) -> bool {
        self.keywords.is_empty() && self.regex.is_none()
    }

    /// Whether `prompt` holds a keyword (when any is given) and matches the regex (when given).
    pub fn holds(&self, prompt: &str) -> bool {
        (self.keywords.is_empty() || contains_any(prompt, &self.keywords))
            && self
                .regex
                .as_ref()
                .is_none_or(|regex| regex.is_match(prompt))
    }
}

/// Lower-cased `keywords`, refusing an empty one (naming `key`).
pub fn compile_keywords(key: &str, keywords: &[String]) -> Result<Vec<String>, ConfigError> {
    keywords
        .iter()
        .map(|keyword| {
            if keyword.trim().is_empty() {
                Err(ConfigError::invalid(key, "keywords must not be empty"))
            } else {
                Ok(keyword.to_lowercase())
            }
        })
        .collect()
}

/// `source` compiled, refusing a bad regex (naming `key`).
pub fn compile_regex(key: &str, source: Option<&str>) -> Result<Option<Regex>, ConfigError> {
    source
        .map(|source| {
            Regex::new(source)
                .map_err(|error| ConfigError::invalid(key, format!("not a valid regex: {error}")))
        })
        .transpose()
}

/// Whether `text` contains any of the lower-cased `keywords`, ignoring case.
pub fn contains_any(text: &str, keywords: &[String]) -> bool {
    let text = text.to_lowercase();
    keywords
        .iter()
        .any(|keyword| text.contains(keyword.as_str()))
}

/// Whether `value` is in `list`; an empty list admits every value.
pub fn listed(list: &[String], value: &str) -> bool {
    list.is_empty() || list.iter().any(|v| v == value)
}

/// The text the prompt conditions see: the request's own messages, one per line.
pub fn prompt_text(messages: &[Message]) -> String {
    messages
        .iter()
        .map(|message| message.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(field: &str) -> String {
        format!("x.{field}")
    }

    #[test]
    fn keywords_and_regex_must_both_hold() {
        let m = PromptMatch::new(&key, &["Prove".to_string()], Some(r"\d")).unwrap();
        assert!(m.holds("please PROVE 2 things"));
        assert!(!m.holds("please prove things"));
        assert!(!m.holds("2 things"));
        assert!(PromptMatch::default().holds("anything"));
        assert!(PromptMatch::default().is_empty() && !m.is_empty());
    }

    #[test]
    fn bad_keywords_and_regexes_name_their_key() {
        let error = PromptMatch::new(&key, &[" ".to_string()], None).unwrap_err();
        assert!(error.to_string().contains("x.prompt_keywords"), "{error}");
        let error = PromptMatch::new(&key, &[], Some("(")).unwrap_err();
        assert!(error.to_string().contains("x.prompt_regex"), "{error}");
    }

    #[test]
    fn an_empty_list_admits_all() {
        assert!(listed(&[], "a"));
        assert!(listed(&["a".to_string()], "a"));
        assert!(!listed(&["a".to_string()], "b"));
    }
}
