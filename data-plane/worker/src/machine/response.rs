//! What a command's response is recorded as: `ResponseRecorded` parts,
//! built as the response passes (rows as the client got them, masked), so
//! that nothing of a result is held but what the record carries.

use chrono::{DateTime, Utc};
use gatehouse_events::{Cell, MaskingCounts, ResponseRecorded, ResponseSummary};
use gatehouse_masking::Stats;
use ring::digest;

/// Most bytes of rows in one `ResponseRecorded` part, as JSON. A row
/// larger than this is counted but not recorded, so that every part fits
/// the event log's `max_payload` (1 MiB by default).
pub(crate) const PART_BYTES: usize = 256 * 1024;

/// The response being built, and the parts ready to record.
pub(crate) struct ResponseLog {
    /// Most bytes of rows one command's record carries; 0: none.
    max_bytes: usize,
    open: Option<Open>,
    /// Parts ready to record.
    pub ready: Vec<ResponseRecorded>,
}

struct Open {
    command: u64,
    part: u32,
    rows: Vec<Vec<Option<Cell>>>,
    part_bytes: usize,
    recorded: usize,
    count: u64,
    bytes: u64,
    sha: digest::Context,
    truncated: bool,
    tags: Vec<String>,
    error: Option<String>,
    started: DateTime<Utc>,
}

impl ResponseLog {
    /// `max_bytes`: the rows one command's record may carry (0 when rows
    /// are not recorded: the target does not mask).
    pub fn new(max_bytes: usize) -> Self {
        ResponseLog {
            max_bytes,
            open: None,
            ready: Vec::new(),
        }
    }

    /// The response of `command` goes on (or begins).
    fn open(&mut self, command: u64) -> &mut Open {
        if self.open.as_ref().is_some_and(|o| o.command != command) {
            self.finish(Stats::default());
        }
        self.open.get_or_insert_with(|| Open {
            command,
            part: 0,
            rows: Vec::new(),
            part_bytes: 0,
            recorded: 0,
            count: 0,
            bytes: 0,
            sha: digest::Context::new(&digest::SHA256),
            truncated: false,
            tags: Vec::new(),
            error: None,
            started: Utc::now(),
        })
    }

    /// Whether a row of `command` would be recorded: worth building.
    pub fn wants_row(&self, command: u64) -> bool {
        self.max_bytes > 0
            && self
                .open
                .as_ref()
                .is_none_or(|o| o.command != command || !o.truncated)
    }

    /// A row (or COPY data message) of `command`, as the client got it
    /// (`sent`), and as it is recorded (`None`: not recorded).
    pub fn row(&mut self, command: u64, sent: &[u8], cells: Option<Vec<Option<Cell>>>) {
        let max = self.max_bytes;
        let open = self.open(command);
        open.sha.update(sent);
        open.count += 1;
        open.bytes += sent.len() as u64;
        let Some(cells) = cells else {
            open.truncated = true;
            return;
        };
        if open.truncated {
            return;
        }
        let size = cells.iter().map(cell_size).sum::<usize>() + 3;
        if open.recorded + size > max || open.part_bytes + size > PART_BYTES {
            // Past the record's limit, or a part could not carry it: the
            // rest is counted only (rows stay in order, none is skipped).
            open.truncated = true;
            return;
        }
        open.recorded += size;
        open.part_bytes += size;
        open.rows.push(cells);
        if open.part_bytes >= PART_BYTES / 2 {
            let part = ResponseRecorded {
                command_seq: open.command,
                part: open.part,
                last: false,
                rows: std::mem::take(&mut open.rows),
                summary: None,
            };
            open.part += 1;
            open.part_bytes = 0;
            self.ready.push(part);
        }
    }

    /// A command tag (`CommandComplete`) of `command`.
    pub fn tag(&mut self, command: u64, tag: &[u8]) {
        let tag = String::from_utf8_lossy(tag.strip_suffix(b"\0").unwrap_or(tag)).into_owned();
        self.open(command).tags.push(tag);
    }

    /// The error that ended `command`.
    pub fn error(&mut self, command: u64, sqlstate: String) {
        self.open(command).error = Some(sqlstate);
    }

    /// The response in progress is complete: its last part is ready.
    /// `masked`: what masking did to it for the client.
    pub fn finish(&mut self, masked: Stats) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        let summary = ResponseSummary {
            rows: open.count,
            bytes: open.bytes,
            sha256: hex::encode(open.sha.finish()),
            truncated: open.truncated,
            tags: std::mem::take(&mut open.tags),
            error: open.error.take(),
            duration_ms: (Utc::now() - open.started).num_milliseconds().max(0) as u64,
            masked: MaskingCounts {
                values: masked.values,
                by_column: masked.by_column,
                detectors: masked
                    .detectors()
                    .map(|(d, n)| (d.name().to_string(), n))
                    .collect(),
            },
        };
        let part = ResponseRecorded {
            command_seq: open.command,
            part: open.part,
            last: true,
            rows: open.rows,
            summary: Some(summary),
        };
        self.ready.push(part);
    }
}

pub(crate) fn size_of_part(p: &ResponseRecorded) -> usize {
    512 + p.rows.iter().flatten().map(cell_size).sum::<usize>()
}

/// A value's size in JSON, at most: a control character is written as
/// `\u00XX`.
fn cell_size(c: &Option<Cell>) -> usize {
    match c {
        None => 5,
        Some(Cell::Text(t)) => {
            t.len()
                + 3
                + 5 * t
                    .bytes()
                    .filter(|&b| b < 0x20 || b == b'"' || b == b'\\')
                    .count()
        }
        Some(Cell::Binary { base64 }) => base64.len() + 14,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Option<Cell> {
        Some(Cell::Text(s.into()))
    }

    #[test]
    fn a_response_is_parts_of_rows_then_a_summary() {
        let mut log = ResponseLog::new(1 << 20);
        log.row(7, b"D-frame-1", Some(vec![text("a"), None]));
        log.row(7, b"D-frame-2", Some(vec![text("b"), None]));
        log.tag(7, b"SELECT 2\0");
        assert!(log.ready.is_empty(), "nothing before the end");
        log.finish(Stats::default());
        let [part] = &log.ready[..] else {
            panic!("{:?}", log.ready)
        };
        assert_eq!(part.command_seq, 7);
        assert!(part.last);
        assert_eq!(part.rows.len(), 2);
        let s = part.summary.as_ref().unwrap();
        assert_eq!((s.rows, s.bytes, s.truncated), (2, 18, false));
        assert_eq!(s.tags, ["SELECT 2"]);
        let mut sha = digest::Context::new(&digest::SHA256);
        sha.update(b"D-frame-1");
        sha.update(b"D-frame-2");
        assert_eq!(s.sha256, hex::encode(sha.finish()));
    }

    #[test]
    fn rows_past_the_cap_are_counted_not_kept_and_parts_are_bounded() {
        let mut log = ResponseLog::new(600 * 1024);
        let value = "x".repeat(1000);
        for _ in 0..1000 {
            log.row(1, b"row", Some(vec![text(&value)]));
        }
        log.finish(Stats::default());
        let kept: usize = log.ready.iter().map(|p| p.rows.len()).sum();
        assert!((500..=615).contains(&kept), "{kept}");
        assert!(log.ready.len() >= 3);
        for p in &log.ready {
            let bytes: usize = p.rows.iter().flatten().flatten().map(|_| 1003).sum();
            assert!(bytes <= PART_BYTES + 1003, "{bytes}");
        }
        let s = log.ready.last().unwrap().summary.as_ref().unwrap();
        assert_eq!(s.rows, 1000, "every row counted");
        assert!(s.truncated);
    }

    #[test]
    fn without_rows_recorded_a_response_is_its_summary() {
        let mut log = ResponseLog::new(0);
        assert!(!log.wants_row(3));
        log.row(3, b"row", None);
        log.error(3, "23505".into());
        // The next command's answer ends it.
        log.tag(4, b"INSERT 0 1\0");
        log.finish(Stats::default());
        assert_eq!(log.ready.len(), 2);
        let first = log.ready[0].summary.as_ref().unwrap();
        assert_eq!(log.ready[0].command_seq, 3);
        assert!(log.ready[0].rows.is_empty());
        assert_eq!((first.rows, first.truncated), (1, true));
        assert_eq!(first.error.as_deref(), Some("23505"));
        assert_eq!(log.ready[1].command_seq, 4);
    }
}
