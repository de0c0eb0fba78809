//! The distinct subscription filters the broker has taken, and which account added each.
//!
//! rumqttd gives every distinct filter ever subscribed its own in-memory log (up to
//! `segment_size × segment_count` bytes of what matched it) and never drops one, even when
//! nobody subscribes to it any more. The front door records each filter before it forwards
//! a SUBSCRIBE, charging a new one to the account that asked first (a controller's
//! credential, an operator account, or all anonymous clients together), and refuses a
//! SUBSCRIBE that would take that account over its budget. Subscribing to a filter already
//! known costs nothing. So the logs number at most the budget times the accounts, whatever
//! clients ask for, and one account cannot use up what the others need.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

/// The filter whose log a subscription reads: a shared subscription
/// `$share/{group}/{filter}` reads the log of `{filter}`.
fn log_of(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

#[derive(Default)]
struct Book {
    /// Filter → the account it was charged to.
    known: HashMap<String, String>,
    /// Filters charged per account.
    by_account: HashMap<String, usize>,
}

/// The filters let through to rumqttd.
pub(crate) struct FilterBook {
    per_account: usize,
    book: Mutex<Book>,
}

/// A SUBSCRIBE that would take its account over its budget: the first filter that does
/// not fit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OverQuota(pub(crate) String);

impl FilterBook {
    /// At most `per_account` new filters per account (0: no limit).
    pub(crate) fn new(per_account: usize) -> Self {
        FilterBook {
            per_account,
            book: Mutex::new(Book::default()),
        }
    }

    /// Records the filters of one SUBSCRIBE from `account`: all or none.
    ///
    /// # Errors
    /// [`OverQuota`] (nothing recorded) when the new ones would take the account over its
    /// budget.
    pub(crate) fn record(&self, account: &str, filters: &[&str]) -> Result<(), OverQuota> {
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        let new: HashSet<&str> = filters
            .iter()
            .map(|f| log_of(f))
            .filter(|f| !book.known.contains_key(*f))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let held = book.by_account.get(account).copied().unwrap_or(0);
        if self.per_account > 0 && held + new.len() > self.per_account {
            let first = filters
                .iter()
                .find(|f| new.contains(log_of(f)))
                .map_or_else(String::new, |f| (*f).to_owned());
            return Err(OverQuota(first));
        }
        *book.by_account.entry(account.to_owned()).or_default() += new.len();
        for f in new {
            book.known.insert(f.to_owned(), account.to_owned());
        }
        Ok(())
    }

    /// Filters recorded.
    pub(crate) fn len(&self) -> usize {
        self.book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .known
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_account_adds_at_most_its_budget_and_known_filters_are_free() {
        let b = FilterBook::new(3);
        assert_eq!(b.record("a", &["t/+", "u/#"]), Ok(()));
        assert_eq!(
            b.record("a", &["t/+", "t/+", "u/#"]),
            Ok(()),
            "known: not charged"
        );
        assert_eq!(
            b.record("a", &["t/+", "v", "w"]),
            Err(OverQuota("v".into())),
            "two new, one left: neither taken"
        );
        assert_eq!(b.len(), 2);
        assert_eq!(b.record("a", &["v", "v"]), Ok(()));
        assert_eq!(b.record("a", &["w"]), Err(OverQuota("w".into())));
        // Another account is not held back by this one, and pays nothing for what is known.
        assert_eq!(b.record("b", &["t/+", "u/#", "v", "w"]), Ok(()));
        // A shared subscription reads the filter's own log.
        assert_eq!(b.record("a", &["$share/g/t/+", "$share/h/w"]), Ok(()));
        assert_eq!(
            b.record("a", &["$share/g/x"]),
            Err(OverQuota("$share/g/x".into()))
        );
        assert_eq!(b.len(), 4);
        let unlimited = FilterBook::new(0);
        for i in 0..10_000 {
            assert_eq!(unlimited.record("a", &[&format!("t/{i}")]), Ok(()));
        }
    }
}
