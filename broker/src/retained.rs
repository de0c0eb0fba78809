//! Who holds which retained message, and how much each account holds.
//!
//! rumqttd keeps every retained message in memory for ever (until replaced or cleared by
//! an empty retained PUBLISH). The front door records each retained PUBLISH (and each
//! retained will, from CONNECT: it may be published later without the client) before it
//! forwards it, charging its topic and payload bytes to the account that sent it, and
//! refuses one that would take the account over its topic or byte budget. Replacing a
//! message credits the account that held it; an empty payload clears the topic.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

#[derive(Default, Clone, Copy)]
struct Usage {
    topics: usize,
    bytes: usize,
}

#[derive(Default)]
struct Book {
    /// Topic → (account, bytes charged).
    by_topic: HashMap<String, (String, usize)>,
    by_account: HashMap<String, Usage>,
    total: Usage,
}

impl Book {
    fn credit(&mut self, account: &str, bytes: usize) {
        if let Some(u) = self.by_account.get_mut(account) {
            u.topics = u.topics.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(bytes);
            if u.topics == 0 {
                self.by_account.remove(account);
            }
        }
        self.total.topics = self.total.topics.saturating_sub(1);
        self.total.bytes = self.total.bytes.saturating_sub(bytes);
    }
}

/// The retained messages the front door let through.
pub(crate) struct RetainedLedger {
    max_topics: usize,
    max_bytes: usize,
    book: Mutex<Book>,
}

/// A retained message that would take its account over budget.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OverQuota;

impl RetainedLedger {
    /// Budgets per account (0: no limit).
    pub(crate) fn new(max_topics: usize, max_bytes: usize) -> Self {
        RetainedLedger {
            max_topics,
            max_bytes,
            book: Mutex::new(Book::default()),
        }
    }

    /// Records a retained message of `payload_len` bytes from `account` on `topic`.
    ///
    /// # Errors
    /// [`OverQuota`] (nothing recorded) when the account would hold more than its budget.
    pub(crate) fn record(
        &self,
        account: &str,
        topic: &str,
        payload_len: usize,
    ) -> Result<(), OverQuota> {
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        if payload_len == 0 {
            if let Some((owner, bytes)) = book.by_topic.remove(topic) {
                book.credit(&owner, bytes);
            }
            return Ok(());
        }
        let cost = topic.len().saturating_add(payload_len);
        let (own_topic, own_bytes) = match book.by_topic.get(topic) {
            Some((owner, bytes)) if owner == account => (1, *bytes),
            _ => (0, 0),
        };
        let now = book.by_account.get(account).copied().unwrap_or_default();
        let topics = now.topics - own_topic + 1;
        let bytes = now.bytes - own_bytes + cost;
        if (self.max_topics > 0 && topics > self.max_topics)
            || (self.max_bytes > 0 && bytes > self.max_bytes)
        {
            return Err(OverQuota);
        }
        if let Some((owner, old)) = book.by_topic.remove(topic) {
            book.credit(&owner, old);
        }
        let u = book.by_account.entry(account.to_owned()).or_default();
        u.topics += 1;
        u.bytes += cost;
        book.total.topics += 1;
        book.total.bytes += cost;
        book.by_topic
            .insert(topic.to_owned(), (account.to_owned(), cost));
        Ok(())
    }

    /// Retained messages recorded, and their bytes.
    pub(crate) fn totals(&self) -> (usize, usize) {
        let book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        (book.total.topics, book.total.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_count_topics_and_bytes_per_account() {
        let l = RetainedLedger::new(2, 100);
        assert_eq!(l.record("a", "t/1", 10), Ok(()));
        assert_eq!(l.record("a", "t/2", 10), Ok(()));
        assert_eq!(l.record("a", "t/3", 10), Err(OverQuota), "a third topic");
        // Replacing its own message is always possible within the bytes.
        assert_eq!(l.record("a", "t/1", 80), Ok(()));
        assert_eq!(l.totals(), (2, 3 + 80 + 3 + 10));
        assert_eq!(l.record("a", "t/2", 20), Err(OverQuota), "bytes");
        // Another account has its own budget; taking over a topic credits the holder.
        assert_eq!(l.record("b", "t/1", 5), Ok(()));
        assert_eq!(l.record("a", "t/3", 10), Ok(()));
        // An empty payload clears the topic and credits whoever held it.
        assert_eq!(l.record("b", "t/2", 0), Ok(()));
        assert_eq!(l.record("a", "t/4", 10), Ok(()));
        assert_eq!(l.totals(), (3, 8 + 13 + 13));
    }

    #[test]
    fn zero_means_no_limit() {
        let l = RetainedLedger::new(0, 0);
        for i in 0..100 {
            assert_eq!(l.record("a", &format!("t/{i}"), 1000), Ok(()));
        }
        assert_eq!(l.totals().0, 100);
    }
}
