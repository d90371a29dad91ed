//! The `Server-Timing` header (W3C Server Timing): written by the server, read by
//! `paytrace load` and the tests. One format, one parser.
//!
//! `queue;dur=0.1, acquire;dur=0.2, claim;dur=0.9, provider;dur=3.1;desc="slice 950ms", persist;dur=0.8, total;dur=5.3`

use std::time::Duration;

/// One metric of the header: a name, its milliseconds, and a description when it has one.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dur_ms: f64,
    pub desc: Option<String>,
}

impl Entry {
    pub fn new(name: &str, dur: Duration) -> Entry {
        Entry {
            name: name.to_string(),
            dur_ms: round_ms(dur),
            desc: None,
        }
    }

    /// The slice a step was given, as its description says (`desc="slice 950ms"`).
    pub fn slice_ms(&self) -> Option<u64> {
        self.desc
            .as_deref()?
            .strip_prefix("slice ")?
            .strip_suffix("ms")?
            .parse()
            .ok()
    }
}

/// Milliseconds to a tenth.
pub fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

pub fn format(entries: &[Entry]) -> String {
    entries
        .iter()
        .map(|e| match &e.desc {
            Some(desc) => format!("{};dur={};desc=\"{desc}\"", e.name, e.dur_ms),
            None => format!("{};dur={}", e.name, e.dur_ms),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every entry that has a `dur`; others are skipped.
pub fn parse(header: &str) -> Vec<Entry> {
    header
        .split(',')
        .filter_map(|raw| {
            let mut parts = raw.trim().split(';').map(str::trim);
            let name = parts.next()?.to_string();
            let (mut dur, mut desc) = (None, None);
            for p in parts {
                if let Some(d) = p.strip_prefix("dur=") {
                    dur = d.parse::<f64>().ok();
                } else if let Some(d) = p.strip_prefix("desc=") {
                    desc = Some(d.trim_matches('"').to_string());
                }
            }
            Some(Entry {
                name,
                dur_ms: dur?,
                desc,
            })
        })
        .collect()
}

/// The milliseconds of entry `name`, if the header has it.
pub fn dur_of(header: &str, name: &str) -> Option<f64> {
    parse(header)
        .into_iter()
        .find(|e| e.name == name)
        .map(|e| e.dur_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back() {
        let mut provider = Entry::new("provider", Duration::from_micros(3_140));
        provider.desc = Some("slice 950ms".into());
        let header = format(&[
            Entry::new("queue", Duration::from_micros(120)),
            provider,
            Entry::new("total", Duration::from_millis(5)),
        ]);
        assert_eq!(
            header,
            "queue;dur=0.1, provider;dur=3.1;desc=\"slice 950ms\", total;dur=5"
        );
        let back = parse(&header);
        assert_eq!(back.len(), 3);
        assert_eq!(back[1].slice_ms(), Some(950));
        assert_eq!(dur_of(&header, "total"), Some(5.0));
        assert_eq!(dur_of(&header, "persist"), None);
    }

    #[test]
    fn entries_without_a_duration_are_skipped() {
        assert_eq!(parse("cache;desc=\"hit\", db;dur=x, app;dur=2").len(), 1);
        assert!(parse("").is_empty());
    }
}
