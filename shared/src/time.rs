//! Time as the wire carries it: Python `datetime.isoformat()` text, and an injectable clock.
//!
//! We always write UTC with microsecond precision and a `+00:00` offset, omitting the
//! fraction when it is zero (`2026-03-01T12:00:00+00:00`, `2026-03-01T12:00:00.500000+00:00`),
//! which is what Python prints. We read what Python 3.11's `fromisoformat` reads from a
//! well-behaved peer: `T`, `t` or space between date and time, optional seconds, a fraction
//! of any length (truncated to microseconds), `Z` or a numeric offset; a time without an
//! offset is UTC.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};

/// A source of the current time, injectable so time-dependent logic is testable.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time, UTC.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to (tests, and `pdsno verify --at`).
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock stopped at `t` (microsecond precision).
    pub fn new(t: DateTime<Utc>) -> Self {
        ManualClock(Arc::new(AtomicI64::new(t.timestamp_micros())))
    }

    /// Moves the clock by `d` (which may be negative).
    pub fn advance(&self, d: Duration) {
        let micros = d.num_microseconds().unwrap_or(i64::MAX);
        self.0.fetch_add(micros, Ordering::SeqCst);
    }

    /// Sets the clock to `t`.
    pub fn set(&self, t: DateTime<Utc>) {
        self.0.store(t.timestamp_micros(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.0.load(Ordering::SeqCst)).unwrap_or_default()
    }
}

/// `t` as Python's `isoformat()` prints an aware UTC datetime.
pub fn format_iso(t: DateTime<Utc>) -> String {
    use chrono::Datelike;
    use std::fmt::Write as _;
    let micros = t.nanosecond() % 1_000_000_000 / 1_000;
    let mut s = String::with_capacity(32);
    let _ = write!(
        s,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if micros != 0 {
        let _ = write!(s, ".{micros:06}");
    }
    s.push_str("+00:00");
    s
}

/// `t` truncated to microseconds, the precision of the wire.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Why a time text could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Invalid isoformat string: {0:?}")]
pub struct TimeError(pub String);

/// Parses an ISO-8601 time as Python's `datetime.fromisoformat` does, converting to UTC.
///
/// # Errors
/// [`TimeError`] (its text mirrors Python's `ValueError`) when `s` is not such a time.
pub fn parse_iso(s: &str) -> Result<DateTime<Utc>, TimeError> {
    let err = || TimeError(truncate_for_error(s));
    let b = s.as_bytes();
    let mut c = Cursor { b, i: 0 };
    let year = c.digits(4).ok_or_else(err)?;
    c.expect(b'-').ok_or_else(err)?;
    let month = c.digits(2).ok_or_else(err)?;
    c.expect(b'-').ok_or_else(err)?;
    let day = c.digits(2).ok_or_else(err)?;
    let date = NaiveDate::from_ymd_opt(year as i32, month, day).ok_or_else(err)?;
    if c.done() {
        return Ok(Utc.from_utc_datetime(&date.and_time(NaiveTime::MIN)));
    }
    match c.next() {
        Some(b'T' | b't' | b' ') => {}
        _ => return Err(err()),
    }
    let hour = c.digits(2).ok_or_else(err)?;
    let mut minute = 0;
    let mut second = 0;
    let mut micros = 0;
    if c.peek() == Some(b':') {
        c.i += 1;
        minute = c.digits(2).ok_or_else(err)?;
        if c.peek() == Some(b':') {
            c.i += 1;
            second = c.digits(2).ok_or_else(err)?;
            if let Some(b'.' | b',') = c.peek() {
                c.i += 1;
                micros = c.fraction_micros().ok_or_else(err)?;
            }
        }
    }
    let time = NaiveTime::from_hms_micro_opt(hour, minute, second, micros).ok_or_else(err)?;
    let naive = NaiveDateTime::new(date, time);
    let offset_secs: i64 = match c.next() {
        None => 0,
        Some(b'Z' | b'z') => 0,
        Some(sign @ (b'+' | b'-')) => {
            let oh = c.digits(2).ok_or_else(err)?;
            let mut om = 0;
            let mut os = 0;
            if !c.done() {
                if c.peek() == Some(b':') {
                    c.i += 1;
                }
                om = c.digits(2).ok_or_else(err)?;
                if c.peek() == Some(b':') {
                    c.i += 1;
                    os = c.digits(2).ok_or_else(err)?;
                    if c.peek() == Some(b'.') {
                        c.i += 1;
                        c.fraction_micros().ok_or_else(err)?;
                    }
                }
            }
            if oh > 23 || om > 59 || os > 59 {
                return Err(err());
            }
            let total = i64::from(oh * 3600 + om * 60 + os);
            if sign == b'-' { -total } else { total }
        }
        Some(_) => return Err(err()),
    };
    if !c.done() {
        return Err(err());
    }
    let utc = Utc.from_utc_datetime(&naive) - Duration::seconds(offset_secs);
    Ok(utc)
}

fn truncate_for_error(s: &str) -> String {
    s.chars().take(64).collect()
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }
    fn done(&self) -> bool {
        self.i >= self.b.len()
    }
    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }
    fn digits(&mut self, n: usize) -> Option<u32> {
        let chunk = self.b.get(self.i..self.i + n)?;
        let mut v = 0u32;
        for &d in chunk {
            if !d.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(d - b'0');
        }
        self.i += n;
        Some(v)
    }
    /// One or more digits of a fraction, truncated to microseconds.
    fn fraction_micros(&mut self) -> Option<u32> {
        let start = self.i;
        let mut micros = 0u32;
        while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
            if self.i - start < 6 {
                micros = micros * 10 + u32::from(d - b'0');
            }
            self.i += 1;
        }
        let n = self.i - start;
        if n == 0 {
            return None;
        }
        for _ in n..6 {
            micros *= 10;
        }
        Some(micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> String {
        format_iso(parse_iso(s).unwrap_or_else(|e| panic!("{s}: {e}")))
    }

    #[test]
    fn formats_like_python_isoformat() {
        let base = Utc
            .with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
            .single()
            .expect("valid");
        assert_eq!(format_iso(base), "2026-03-01T12:00:00+00:00");
        assert_eq!(
            format_iso(base + Duration::microseconds(500_000)),
            "2026-03-01T12:00:00.500000+00:00"
        );
        assert_eq!(
            format_iso(base + Duration::microseconds(1)),
            "2026-03-01T12:00:00.000001+00:00"
        );
        // Nanoseconds below a microsecond are not printed (Python has none).
        assert_eq!(
            format_iso(base + Duration::nanoseconds(999)),
            "2026-03-01T12:00:00+00:00"
        );
    }

    #[test]
    fn parses_what_fromisoformat_reads() {
        assert_eq!(t("2026-03-01T12:00:00+00:00"), "2026-03-01T12:00:00+00:00");
        assert_eq!(t("2026-03-01T12:00:00Z"), "2026-03-01T12:00:00+00:00");
        assert_eq!(t("2026-03-01T12:00:00"), "2026-03-01T12:00:00+00:00");
        assert_eq!(
            t("2026-03-01 12:00:00.5"),
            "2026-03-01T12:00:00.500000+00:00"
        );
        assert_eq!(
            t("2026-03-01T12:00:00.1234567+00:00"),
            "2026-03-01T12:00:00.123456+00:00"
        );
        assert_eq!(t("2026-03-01T14:30:00+02:30"), "2026-03-01T12:00:00+00:00");
        assert_eq!(t("2026-03-01T10:00:00-0200"), "2026-03-01T12:00:00+00:00");
        assert_eq!(t("2026-03-01T12:00"), "2026-03-01T12:00:00+00:00");
        assert_eq!(t("2026-03-01"), "2026-03-01T00:00:00+00:00");
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00",
            "2026-02-30T00:00:00",
            "2026-03-01T25:00:00",
            "2026-03-01T12:00:00+",
            "2026-03-01T12:00:00+24:00",
            "2026-03-01T12:00:00.",
            "2026-03-01T12:00:00 extra",
            "2026-03-01X12:00:00",
            "２０２６-03-01",
        ] {
            assert!(parse_iso(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = Utc
            .with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
            .single()
            .expect("valid");
        let c = ManualClock::new(start);
        assert_eq!(c.now(), start);
        c.advance(Duration::seconds(301));
        assert_eq!(c.now(), start + Duration::seconds(301));
    }
}
