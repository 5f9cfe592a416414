//! Topic names, topic filters, shared subscriptions, and the subscription trie.
//!
//! [`TopicName`] and [`TopicFilter`] are validated once, at the edge, and then passed around as
//! cheap clones (`Arc<str>`).

mod tree;
mod trie;

use std::sync::Arc;

pub use tree::TopicTree;
pub use trie::SubscriptionTrie;

/// Why a topic string is not acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than 65535 bytes")]
    TooLong,
    #[error("topic contains U+0000")]
    NullChar,
    #[error("topic name contains a wildcard")]
    WildcardInName,
    #[error("'#' must be the last level and alone in its level")]
    BadMultiLevelWildcard,
    #[error("'+' must occupy a whole level")]
    BadSingleLevelWildcard,
    #[error("malformed shared subscription")]
    BadSharedSubscription,
}

/// A topic name as published (MQTT 4.7): non-empty, no wildcards, no U+0000.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    pub fn new(s: &str) -> Result<TopicName, TopicError> {
        check_common(s)?;
        if s.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(TopicError::WildcardInName);
        }
        Ok(TopicName(Arc::from(s)))
    }

    /// The empty name a MQTT 5 PUBLISH carries when a topic alias stands in for it. Only the
    /// decoder makes one; the session resolves it before anything else sees it.
    pub fn empty_for_alias() -> TopicName {
        TopicName(Arc::from(""))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `$SYS/...` and other `$`-topics are not matched by filters starting with a wildcard.
    pub fn is_dollar(&self) -> bool {
        self.0.starts_with('$')
    }

    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A topic filter as subscribed (MQTT 4.7): wildcards allowed where the spec allows them.
/// Shared subscriptions are parsed apart into [`SubscriptionFilter`] first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(Arc<str>);

impl TopicFilter {
    pub fn new(s: &str) -> Result<TopicFilter, TopicError> {
        check_common(s)?;
        let mut levels = s.split('/').peekable();
        while let Some(level) = levels.next() {
            if level.contains('#') && (level != "#" || levels.peek().is_some()) {
                return Err(TopicError::BadMultiLevelWildcard);
            }
            if level.contains('+') && level != "+" {
                return Err(TopicError::BadSingleLevelWildcard);
            }
        }
        Ok(TopicFilter(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn has_wildcard(&self) -> bool {
        self.0.bytes().any(|b| b == b'+' || b == b'#')
    }

    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }

    /// Whether `topic` matches this filter (MQTT 4.7.1-4.7.2): `+` one level, `#` this level and
    /// every level below (including the parent), and a filter starting with a wildcard does not
    /// match a `$`-topic. This is the reference the trie is tested against.
    pub fn matches(&self, topic: &TopicName) -> bool {
        if topic.is_dollar() && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut f = self.levels();
        let mut t = topic.levels();
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(fl), Some(tl)) if fl == tl => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl std::fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a SUBSCRIBE asked for: a plain filter, or a member of a shared group
/// (`$share/<group>/<filter>`, MQTT 5 4.8.2; Flux accepts it from 3.1.1 clients too, like EMQX and
/// Mosquitto).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SubscriptionFilter {
    Plain(TopicFilter),
    Shared { group: Arc<str>, filter: TopicFilter },
}

impl SubscriptionFilter {
    pub fn parse(s: &str) -> Result<SubscriptionFilter, TopicError> {
        if let Some(rest) = s.strip_prefix("$share/") {
            let (group, filter) = rest.split_once('/').ok_or(TopicError::BadSharedSubscription)?;
            if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                return Err(TopicError::BadSharedSubscription);
            }
            let filter = TopicFilter::new(filter)?;
            return Ok(SubscriptionFilter::Shared { group: Arc::from(group), filter });
        }
        if s == "$share" || s.starts_with("$share/") {
            return Err(TopicError::BadSharedSubscription);
        }
        Ok(SubscriptionFilter::Plain(TopicFilter::new(s)?))
    }

    pub fn filter(&self) -> &TopicFilter {
        match self {
            SubscriptionFilter::Plain(f) => f,
            SubscriptionFilter::Shared { filter, .. } => filter,
        }
    }

    pub fn group(&self) -> Option<&str> {
        match self {
            SubscriptionFilter::Plain(_) => None,
            SubscriptionFilter::Shared { group, .. } => Some(group),
        }
    }
}

impl std::fmt::Display for SubscriptionFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscriptionFilter::Plain(t) => write!(f, "{t}"),
            SubscriptionFilter::Shared { group, filter } => write!(f, "$share/{group}/{filter}"),
        }
    }
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > usize::from(u16::MAX) {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::NullChar);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }
    fn t(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    #[test]
    fn mqtt_4_7_1_filter_wildcard_rules() {
        for ok in ["#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "+/#", "sport/tennis/#"] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok}");
        }
        for bad in ["a#", "a/#/b", "a/b#", "a+", "a/+b", "#/a", ""] {
            assert!(TopicFilter::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mqtt_4_7_3_topic_name_rules() {
        assert!(TopicName::new("a/+").is_err());
        assert!(TopicName::new("a/#").is_err());
        assert!(TopicName::new("").is_err());
        assert!(TopicName::new("a\0b").is_err());
        assert!(TopicName::new("/").is_ok());
    }

    #[test]
    fn mqtt_4_7_1_2_matching() {
        assert!(f("sport/tennis/player1/#").matches(&t("sport/tennis/player1")));
        assert!(f("sport/tennis/player1/#").matches(&t("sport/tennis/player1/ranking")));
        assert!(f("sport/#").matches(&t("sport")));
        assert!(f("sport/tennis/+").matches(&t("sport/tennis/player1")));
        assert!(!f("sport/tennis/+").matches(&t("sport/tennis/player1/ranking")));
        assert!(!f("sport/+").matches(&t("sport")));
        assert!(f("sport/+").matches(&t("sport/")));
        assert!(f("+/+").matches(&t("/finance")));
        assert!(f("/+").matches(&t("/finance")));
        assert!(!f("+").matches(&t("/finance")));
    }

    #[test]
    fn mqtt_4_7_2_dollar_topics_not_matched_by_leading_wildcard() {
        assert!(!f("#").matches(&t("$SYS/uptime")));
        assert!(!f("+/uptime").matches(&t("$SYS/uptime")));
        assert!(f("$SYS/#").matches(&t("$SYS/uptime")));
    }

    #[test]
    fn mqtt5_4_8_2_shared_subscription_parse() {
        let s = SubscriptionFilter::parse("$share/g1/a/+").unwrap();
        assert_eq!(s.group(), Some("g1"));
        assert_eq!(s.filter().as_str(), "a/+");
        for bad in ["$share/g1", "$share//a", "$share/g+/a", "$share/g#/a", "$share"] {
            assert!(SubscriptionFilter::parse(bad).is_err(), "{bad}");
        }
    }
}
