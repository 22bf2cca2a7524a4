//! Names and ids of the routing layer, parsed once at the edge: [`ProjectId`], [`Topic`],
//! [`ConnId`]; and the per-shard [`TopicIndex`].
//!
//! Nothing here does I/O or knows about sockets. The core never re-checks a parsed value.

mod index;

pub use index::{Sub, Subscribed, TopicId, TopicIndex, Unsubscribed};

use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or over the length limit.
    #[error("must be 1 to {max} characters long")]
    Length {
        /// The limit.
        max: usize,
    },
    /// A character outside the allowed set.
    #[error("character {0:?} is not allowed (allowed: {1})")]
    Char(char, &'static str),
    /// Topics may not start with `$` (reserved).
    #[error("topics may not start with `$`")]
    Reserved,
    /// A user or device id that is empty or longer than [`MAX_ID_BYTES`].
    #[error("must be 1 to {MAX_ID_BYTES} bytes of UTF-8")]
    IdLength,
    /// A user or device id with a control character.
    #[error("control character {0:?} is not allowed")]
    Control(char),
}

/// A project id: `[a-z0-9_-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProjectId(String);

impl ProjectId {
    /// Longest project id.
    pub const MAX_LEN: usize = 64;

    /// # Errors
    /// [`NameError`] naming the rule broken.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(NameError::Length { max: Self::MAX_LEN });
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
        {
            return Err(NameError::Char(c, "a-z 0-9 _ -"));
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The broadcast topic every connection of a project is subscribed to.
pub const TOPIC_ALL: &str = "all";
/// Prefix of the per-user topics (`user.<sub>`).
pub const USER_PREFIX: &str = "user.";
/// Prefix of the per-device topics (`device.<device>`).
pub const DEVICE_PREFIX: &str = "device.";

/// Longest user id (`sub`) or device id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Checks a user id (a token's `sub`) or a device id: 1 to [`MAX_ID_BYTES`] bytes of UTF-8
/// without control characters. Every id that passes is addressable, byte for byte, as
/// `user.<id>` (or `device.<id>`); the handshake refuses the others.
///
/// # Errors
/// [`NameError::IdLength`] or [`NameError::Control`].
pub fn check_id(id: &str) -> Result<(), NameError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(NameError::IdLength);
    }
    match id.chars().find(|c| c.is_control()) {
        Some(c) => Err(NameError::Control(c)),
        None => Ok(()),
    }
}

/// A topic name: `[A-Za-z0-9_.:*-]{1,128}`, no leading `$`; or `user.<id>` / `device.<id>`
/// where `<id>` is any id [`check_id`] accepts (a token's `sub` is free text).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic(Box<str>);

impl Topic {
    /// Longest topic name.
    pub const MAX_LEN: usize = 128;

    /// # Errors
    /// [`NameError`] naming the rule broken.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if let Some(id) = s
            .strip_prefix(USER_PREFIX)
            .or_else(|| s.strip_prefix(DEVICE_PREFIX))
        {
            check_id(id)?;
            return Ok(Self(s.into()));
        }
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(NameError::Length { max: Self::MAX_LEN });
        }
        if s.starts_with('$') {
            return Err(NameError::Reserved);
        }
        if let Some(c) = s.chars().find(|c| !is_topic_char(*c)) {
            return Err(NameError::Char(c, "A-Z a-z 0-9 _ . : * -"));
        }
        Ok(Self(s.into()))
    }

    /// The per-user topic of `sub` (checked with [`check_id`] at the handshake), byte for
    /// byte: it is what `Topic::parse("user.<sub>")` gives.
    pub fn user(sub: &str) -> Self {
        Self(format!("{USER_PREFIX}{sub}").into())
    }

    /// The per-device topic of `device`.
    pub fn device(device: &str) -> Self {
        Self(format!("{DEVICE_PREFIX}{device}").into())
    }

    /// The broadcast topic.
    pub fn all() -> Self {
        Self(TOPIC_ALL.into())
    }

    /// Whether clients may not subscribe to it explicitly (`user.*`, `device.*`).
    pub fn is_implicit_only(&self) -> bool {
        self.0.starts_with(USER_PREFIX) || self.0.starts_with(DEVICE_PREFIX)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '*' | '-')
}

/// Whether the token's `topics` claim lets a connection subscribe to `topic`: an entry equal
/// to the topic, or an entry ending in `*` whose prefix starts the topic.
pub fn topic_permitted(patterns: &[Box<str>], topic: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => **p == *topic,
    })
}

/// A connection id: the owning shard, the slab slot and the slot's generation. A reused slot
/// gets a new generation, so a stale id never matches the new occupant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// Owning shard.
    pub shard: u16,
    /// Slot in the shard's slab.
    pub slot: u32,
    /// Generation of the slot's occupant.
    pub generation: u32,
}

impl ConnId {
    /// Parses the text form made by `Display` (`<shard>-<slot>-<generation>`, hex).
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('-');
        let shard = u16::from_str_radix(it.next()?, 16).ok()?;
        let slot = u32::from_str_radix(it.next()?, 16).ok()?;
        let generation = u32::from_str_radix(it.next()?, 16).ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(Self {
            shard,
            slot,
            generation,
        })
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{:x}-{:x}", self.shard, self.slot, self.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids() {
        assert!(ProjectId::parse("shop_1-a").is_ok());
        assert_eq!(ProjectId::parse(""), Err(NameError::Length { max: 64 }));
        assert_eq!(
            ProjectId::parse(&"a".repeat(65)),
            Err(NameError::Length { max: 64 })
        );
        assert!(matches!(
            ProjectId::parse("Shop"),
            Err(NameError::Char('S', _))
        ));
    }

    #[test]
    fn topics() {
        assert!(Topic::parse("chat.room:1*-x_Y").is_ok());
        assert_eq!(Topic::parse("$sys"), Err(NameError::Reserved));
        assert!(matches!(Topic::parse("a b"), Err(NameError::Char(' ', _))));
        assert_eq!(
            Topic::parse(&"t".repeat(129)),
            Err(NameError::Length { max: 128 })
        );
        assert!(Topic::parse("user.42").unwrap().is_implicit_only());
        assert!(Topic::parse("device.x").unwrap().is_implicit_only());
        assert!(!Topic::parse("users").unwrap().is_implicit_only());
    }

    /// Every id the handshake accepts is addressable as `user.<id>`, byte for byte.
    #[test]
    fn user_and_device_topics_take_any_id() {
        let long = "é".repeat(MAX_ID_BYTES / 2);
        for id in [
            "auth0|5f1c",
            "alice@example.com",
            "José",
            "a/b.c d",
            "\"q\\",
            &long,
        ] {
            assert_eq!(check_id(id), Ok(()), "{id}");
            let name = format!("user.{id}");
            assert_eq!(Topic::parse(&name), Ok(Topic::user(id)), "{id}");
            assert!(Topic::parse(&name).unwrap().is_implicit_only());
            assert_eq!(Topic::parse(&format!("device.{id}")), Ok(Topic::device(id)));
        }
        assert_eq!(Topic::parse("user."), Err(NameError::IdLength));
        assert_eq!(check_id(""), Err(NameError::IdLength));
        assert_eq!(check_id(&format!("{long}x")), Err(NameError::IdLength));
        assert_eq!(check_id("a\nb"), Err(NameError::Control('\n')));
        assert_eq!(check_id("a\u{85}"), Err(NameError::Control('\u{85}')));
        assert_eq!(Topic::parse("user.a\tb"), Err(NameError::Control('\t')));
        // Other topics keep their character set.
        assert!(matches!(
            Topic::parse("users.a@b"),
            Err(NameError::Char('@', _))
        ));
    }

    #[test]
    fn permissions() {
        let p: Vec<Box<str>> = vec!["news".into(), "chat.*".into()];
        assert!(topic_permitted(&p, "news"));
        assert!(!topic_permitted(&p, "news2"));
        assert!(topic_permitted(&p, "chat.room1"));
        assert!(topic_permitted(&p, "chat."));
        assert!(!topic_permitted(&p, "chat"));
        assert!(!topic_permitted(&[], "news"));
    }

    #[test]
    fn conn_id_round_trip() {
        let id = ConnId {
            shard: 3,
            slot: 70000,
            generation: u32::MAX,
        };
        assert_eq!(ConnId::parse(&id.to_string()), Some(id));
        assert_eq!(ConnId::parse("1-2"), None);
        assert_eq!(ConnId::parse("1-2-3-4"), None);
        assert_eq!(ConnId::parse("x-2-3"), None);
    }
}
