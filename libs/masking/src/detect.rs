//! Content detectors: where in a value a sensitive thing is.
//!
//! One pass over the bytes finds candidates by cheap shape (a run of
//! digits, an `@`, a word of key-like characters); each candidate is then
//! validated (Luhn for cards, mod 97 for IBANs, ranges for SSNs and IPv4,
//! a real parse for IPv6, entropy for generic secrets) before it counts.
//! Values are bytes in UTF-8; every detector matches ASCII only, so a span
//! never splits a multi-byte character.

use std::fmt;

/// What a detector recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detector {
    Email,
    Phone,
    PaymentCard,
    UsSsn,
    Iban,
    IpAddress,
    Jwt,
    /// Access keys of cloud and API providers, recognised by their prefix.
    ApiKey,
    /// Long random-looking tokens (base64 or similar, three character
    /// classes, high entropy).
    HighEntropy,
    /// bcrypt, argon2, crypt(3) SHA-2, SCRAM-SHA-256 and PostgreSQL md5.
    PasswordHash,
    PemPrivateKey,
}

impl Detector {
    pub const ALL: [Detector; 11] = [
        Detector::Email,
        Detector::Phone,
        Detector::PaymentCard,
        Detector::UsSsn,
        Detector::Iban,
        Detector::IpAddress,
        Detector::Jwt,
        Detector::ApiKey,
        Detector::HighEntropy,
        Detector::PasswordHash,
        Detector::PemPrivateKey,
    ];

    /// The name used in configuration and statistics.
    pub fn name(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::PaymentCard => "payment_card",
            Detector::UsSsn => "us_ssn",
            Detector::Iban => "iban",
            Detector::IpAddress => "ip_address",
            Detector::Jwt => "jwt",
            Detector::ApiKey => "api_key",
            Detector::HighEntropy => "high_entropy",
            Detector::PasswordHash => "password_hash",
            Detector::PemPrivateKey => "pem_private_key",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Detectors(u16);

impl Detectors {
    pub fn all() -> Self {
        Detectors::ALL_SET
    }
    const ALL_SET: Detectors = Detectors((1 << Detector::ALL.len()) - 1);

    pub fn none() -> Self {
        Detectors(0)
    }

    pub fn with(mut self, d: Detector) -> Self {
        self.0 |= d.bit();
        self
    }

    pub fn contains(self, d: Detector) -> bool {
        self.0 & d.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<Detector> for Detectors {
    fn from_iter<I: IntoIterator<Item = Detector>>(iter: I) -> Self {
        iter.into_iter().fold(Detectors::none(), Detectors::with)
    }
}

/// A sensitive span of a value: `text[start..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub start: usize,
    pub end: usize,
    pub detector: Detector,
}

/// Bytes outside words that may begin something a detector looks at
/// (words, `$`-hashes among them, are looked at from their first byte).
/// Everything else (spaces, punctuation) is skipped at the cost of one
/// table lookup.
const fn trigger_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = b'0';
    while c <= b'9' {
        t[c as usize] = true;
        c += 1;
    }
    t[b'@' as usize] = true;
    t[b'+' as usize] = true;
    t[b'(' as usize] = true;
    t[b':' as usize] = true;
    t
}
static TRIGGER: [bool; 256] = trigger_table();

/// The end of the word starting at `i`. An `=` inside a word separates a
/// name from its value (`key=AKIA…`) unless it is base64 padding or part
/// of a `$`-delimited hash (`$argon2id$v=19$m=65536,t=3,p=4$…`, whose
/// commas belong to it too).
fn word_end(text: &[u8], i: usize) -> usize {
    let hash = text[i] == b'$';
    let mut j = i;
    while j < text.len() {
        let c = text[j];
        if c == b'=' && !hash && text.get(j + 1).is_some_and(u8::is_ascii_alphanumeric) {
            break;
        }
        if !(is_word(c) || (hash && c == b',')) {
            break;
        }
        j += 1;
    }
    j
}

const fn word_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric()
            || matches!(b, b'_' | b'-' | b'+' | b'/' | b'=' | b'.' | b'$' | b':');
        c += 1;
    }
    t
}
static WORD: [bool; 256] = word_table();

fn is_word(b: u8) -> bool {
    WORD[b as usize]
}

/// Finds the hits of `detectors` in `text`, in order, without overlaps
/// (where two overlap, the one that starts first, or the longer, stands).
pub fn find(text: &[u8], detectors: Detectors, hits: &mut Vec<Hit>) {
    hits.clear();
    if detectors.is_empty() || text.is_empty() {
        return;
    }
    if detectors.contains(Detector::PemPrivateKey) {
        pem(text, hits);
    }
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        // Words: keys, tokens, hashes, IBANs, JWTs, e-mail addresses.
        let at_word_start = i == 0 || !is_word(text[i - 1]) || text[i - 1] == b'=';
        if at_word_start && (b.is_ascii_alphanumeric() || b == b'$') {
            let end = word_end(text, i);
            let word = &text[i..end];
            if word.len() >= 4 {
                let before = hits.len();
                word_hits(text, i, end, detectors, hits);
                // A hit running past the word (an IBAN in groups): go on
                // after it.
                if let Some(h) = hits[before..].iter().map(|h| h.end).max()
                    && h > end
                {
                    i = h;
                    continue;
                }
            }
            // Digits inside the word (a phone or card written without
            // spaces) are looked at below, from the word's start.
            // (A word holds no `@`: an e-mail address is found from its
            // `@`, which ends the word before it.)
            if !b.is_ascii_digit() {
                i = end.max(i + 1);
                continue;
            }
        }
        if !TRIGGER[b as usize] {
            i += 1;
            continue;
        }
        if b == b'@' {
            if detectors.contains(Detector::Email)
                && let Some(h) = email(text, i)
            {
                hits.push(h);
            }
            i += 1;
            continue;
        }
        if b.is_ascii_digit() || b == b'+' || b == b'(' {
            let prev_ok = i == 0 || !(text[i - 1].is_ascii_alphanumeric() || text[i - 1] == b'.');
            if prev_ok {
                let before = hits.len();
                numeric(text, i, detectors, hits);
                if hits.len() > before {
                    i = hits[hits.len() - 1].end;
                    continue;
                }
            }
            // Skip the rest of this run of digits.
            let run = text[i..].iter().take_while(|c| c.is_ascii_digit()).count();
            i += run.max(1);
            continue;
        }
        if b == b':' && detectors.contains(Detector::IpAddress) {
            // IPv6 starting with "::".
            if let Some(h) = ipv6(text, i) {
                hits.push(h);
                i = h.end;
                continue;
            }
        }
        i += 1;
    }
    normalize(hits);
}

/// Sorts hits and drops those overlapping an earlier (or longer) one.
fn normalize(hits: &mut Vec<Hit>) {
    if hits.len() < 2 {
        return;
    }
    hits.sort_unstable_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    let mut kept = 0;
    for k in 1..hits.len() {
        let h = hits[k];
        if h.start < hits[kept].end {
            hits[kept].end = hits[kept].end.max(h.end);
        } else {
            kept += 1;
            hits[kept] = h;
        }
    }
    hits.truncate(kept + 1);
}

/// A word `text[start..end]` of key-like characters.
fn word_hits(text: &[u8], start: usize, end: usize, d: Detectors, hits: &mut Vec<Hit>) {
    // Trailing dots, colons and dashes are punctuation, not part of a token.
    let mut end = end;
    while end > start && matches!(text[end - 1], b'.' | b':' | b'-' | b'/' | b'+') {
        end -= 1;
    }
    let word = &text[start..end];
    let hit = |detector| Hit {
        start,
        end,
        detector,
    };
    if d.contains(Detector::PasswordHash) && password_hash(word) {
        hits.push(hit(Detector::PasswordHash));
        return;
    }
    if d.contains(Detector::Jwt) && jwt(word) {
        hits.push(hit(Detector::Jwt));
        return;
    }
    if d.contains(Detector::ApiKey)
        && let Some(len) = api_key(word)
    {
        hits.push(Hit {
            start,
            end: start + len,
            detector: Detector::ApiKey,
        });
        return;
    }
    if d.contains(Detector::Iban)
        && let Some(len) = iban(text, start)
    {
        hits.push(Hit {
            start,
            end: start + len,
            detector: Detector::Iban,
        });
        return;
    }
    if d.contains(Detector::IpAddress)
        && word.contains(&b':')
        && let Some(h) = ipv6(text, start)
    {
        hits.push(h);
        return;
    }
    if d.contains(Detector::HighEntropy) && word.len() >= 24 {
        // Split on the separators a token would not contain, so that
        // `path/to/file.name` or `a.b.c` are judged by their parts.
        let mut s = start;
        for (k, &c) in word.iter().enumerate() {
            if matches!(c, b'.' | b':' | b'$') {
                high_entropy(text, s, start + k, hits);
                s = start + k + 1;
            }
        }
        high_entropy(text, s, end, hits);
    }
}

fn high_entropy(text: &[u8], start: usize, end: usize, hits: &mut Vec<Hit>) {
    let token = &text[start..end];
    if token.len() < 24 || token.len() > 4096 {
        return;
    }
    let (mut upper, mut lower, mut digit) = (false, false, false);
    let mut counts = [0u16; 128];
    for &c in token {
        upper |= c.is_ascii_uppercase();
        lower |= c.is_ascii_lowercase();
        digit |= c.is_ascii_digit();
        counts[(c & 0x7f) as usize] += 1;
    }
    // Hexadecimal ids, UUIDs and words lack one of the three classes.
    if !(upper && lower && digit) {
        return;
    }
    let n = token.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&k| k > 0)
        .map(|&k| {
            let p = f64::from(k) / n;
            -p * p.log2()
        })
        .sum();
    // Random base64 of 24+ characters is above 4.2 bits per character;
    // identifiers in camelCase or with a few digits stay well below.
    let threshold = if token.len() >= 40 { 4.3 } else { 4.0 };
    if entropy >= threshold {
        hits.push(Hit {
            start,
            end,
            detector: Detector::HighEntropy,
        });
    }
}

fn password_hash(word: &[u8]) -> bool {
    // bcrypt: $2a$10$ + 53 characters of its base64.
    if word.len() == 60
        && word.starts_with(b"$2")
        && matches!(word[2], b'a' | b'b' | b'x' | b'y')
        && word[3] == b'$'
        && word[4].is_ascii_digit()
        && word[5].is_ascii_digit()
        && word[6] == b'$'
    {
        return word[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'/'));
    }
    if word.starts_with(b"$argon2")
        && word.len() > 30
        && word.iter().filter(|&&c| c == b'$').count() >= 4
    {
        return true;
    }
    // crypt(3): $1$ (MD5), $5$ (SHA-256), $6$ (SHA-512), $y$ (yescrypt).
    if word.len() > 20
        && word[0] == b'$'
        && matches!(&word[1..3], b"1$" | b"5$" | b"6$" | b"y$")
        && word.iter().filter(|&&c| c == b'$').count() >= 3
    {
        return true;
    }
    if let Some(rest) = word.strip_prefix(b"SCRAM-SHA-256$") {
        return rest.contains(&b':') && rest.contains(&b'$');
    }
    // PostgreSQL's md5 password: "md5" + 32 hex digits.
    if word.len() == 35 && word.starts_with(b"md5") {
        return word[3..].iter().all(|c| c.is_ascii_hexdigit());
    }
    false
}

fn is_b64url(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

/// A JWT (JWS compact form): three base64url parts, the first a JSON
/// object (`eyJ` is `{"` in base64).
fn jwt(word: &[u8]) -> bool {
    if !word.starts_with(b"eyJ") || word.len() < 20 {
        return false;
    }
    let parts: Vec<&[u8]> = word.split(|&c| c == b'.').collect();
    (parts.len() == 3 || parts.len() == 5)
        && parts[0].len() >= 10
        && parts[1].len() >= 4
        && parts.iter().all(|p| p.iter().all(|&c| is_b64url(c)))
}

/// The length of a provider access key at the start of `word`.
fn api_key(word: &[u8]) -> Option<usize> {
    // (prefix, characters after it at least, at most, alphabet)
    type Alphabet = fn(u8) -> bool;
    fn upper_digit(c: u8) -> bool {
        c.is_ascii_uppercase() || c.is_ascii_digit()
    }
    fn alnum(c: u8) -> bool {
        c.is_ascii_alphanumeric()
    }
    fn token(c: u8) -> bool {
        c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
    }
    const KEYS: &[(&[u8], usize, usize, Alphabet)] = &[
        // AWS access key ids (long-term and temporary).
        (b"AKIA", 16, 16, upper_digit),
        (b"ASIA", 16, 16, upper_digit),
        // GitHub tokens.
        (b"ghp_", 36, 255, alnum),
        (b"gho_", 36, 255, alnum),
        (b"ghu_", 36, 255, alnum),
        (b"ghs_", 36, 255, alnum),
        (b"ghr_", 36, 255, alnum),
        (b"github_pat_", 40, 255, token),
        // GitLab personal access tokens.
        (b"glpat-", 20, 255, token),
        // Slack tokens.
        (b"xoxb-", 10, 255, token),
        (b"xoxp-", 10, 255, token),
        (b"xoxa-", 10, 255, token),
        (b"xoxs-", 10, 255, token),
        // Stripe secret and restricted keys.
        (b"sk_live_", 16, 255, alnum),
        (b"rk_live_", 16, 255, alnum),
        (b"sk_test_", 16, 255, alnum),
        // Google API keys.
        (b"AIza", 35, 35, token),
        // OpenAI and Anthropic keys.
        (b"sk-ant-", 20, 255, token),
        (b"sk-proj-", 20, 255, token),
        // npm and PyPI tokens.
        (b"npm_", 36, 36, alnum),
        (b"pypi-", 50, 255, token),
    ];
    // Every prefix starts with one of these letters.
    if word.len() < 20 || !matches!(word[0], b'A' | b'g' | b'x' | b's' | b'r' | b'n' | b'p') {
        return None;
    }
    for &(prefix, min, max, ok) in KEYS {
        if let Some(rest) = word.strip_prefix(prefix) {
            let n = rest.iter().take_while(|&&c| ok(c)).count().min(max);
            if n >= min {
                return Some(prefix.len() + n);
            }
        }
    }
    None
}

/// An IBAN at `start`: country letters, check digits, 11 to 30 letters or
/// digits, optionally in groups of four separated by single spaces; the
/// ISO 7064 mod 97 check must hold.
fn iban(text: &[u8], start: usize) -> Option<usize> {
    let t = &text[start..];
    if t.len() < 15
        || !t[0].is_ascii_uppercase()
        || !t[1].is_ascii_uppercase()
        || !t[2].is_ascii_digit()
        || !t[3].is_ascii_digit()
    {
        return None;
    }
    let mut chars: Vec<u8> = Vec::with_capacity(34);
    let mut end = 0;
    let mut i = 0;
    while i < t.len() && chars.len() < 34 {
        let c = t[i];
        if c.is_ascii_digit() || c.is_ascii_uppercase() {
            chars.push(c);
            i += 1;
            end = i;
        } else if c == b' '
            && i + 1 < t.len()
            && t[i + 1].is_ascii_alphanumeric()
            && chars.len().is_multiple_of(4)
        {
            i += 1;
        } else {
            break;
        }
    }
    if chars.len() < 15 || (end < t.len() && t[end].is_ascii_alphanumeric()) {
        return None;
    }
    // Move the first four characters to the end; letters count as 10..35.
    let mut rem: u32 = 0;
    for &c in chars[4..].iter().chain(&chars[..4]) {
        let v = if c.is_ascii_digit() {
            u32::from(c - b'0')
        } else {
            u32::from(c - b'A') + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    (rem == 1).then_some(end)
}

/// An e-mail address around the `@` at `at`.
fn email(text: &[u8], at: usize) -> Option<Hit> {
    let local_ok =
        |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-');
    let mut start = at;
    while start > 0 && local_ok(text[start - 1]) {
        start -= 1;
    }
    while start < at && text[start] == b'.' {
        start += 1;
    }
    if start == at {
        return None;
    }
    let domain_ok = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-');
    let mut end = at + 1;
    while end < text.len() && domain_ok(text[end]) {
        end += 1;
    }
    while end > at + 1 && matches!(text[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &text[at + 1..end];
    let dot = domain.iter().rposition(|&c| c == b'.')?;
    let tld = &domain[dot + 1..];
    if dot == 0 || tld.len() < 2 || !tld.iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    Some(Hit {
        start,
        end,
        detector: Detector::Email,
    })
}

/// Something numeric starting at `i`: a card, an SSN, an IPv4 address or
/// a phone number.
fn numeric(text: &[u8], i: usize, d: Detectors, hits: &mut Vec<Hit>) {
    if d.contains(Detector::IpAddress)
        && let Some(h) = ipv4(text, i).or_else(|| ipv6(text, i))
    {
        hits.push(h);
        return;
    }
    if d.contains(Detector::UsSsn)
        && let Some(h) = ssn(text, i)
    {
        hits.push(h);
        return;
    }
    // Digits with single spaces or dashes between them.
    let mut digits = 0;
    let mut end = i;
    let mut j = i;
    let mut luhn_digits = [0u8; 20];
    while j < text.len() {
        let c = text[j];
        if c.is_ascii_digit() {
            if digits < luhn_digits.len() {
                luhn_digits[digits] = c - b'0';
            }
            digits += 1;
            j += 1;
            end = j;
        } else if matches!(c, b' ' | b'-')
            && j + 1 < text.len()
            && text[j + 1].is_ascii_digit()
            && j > i
        {
            j += 1;
        } else {
            break;
        }
        if digits > 19 {
            break;
        }
    }
    let bounded = end >= text.len() || !(text[end].is_ascii_alphanumeric());
    if d.contains(Detector::PaymentCard)
        && (13..=19).contains(&digits)
        && bounded
        && luhn(&luhn_digits[..digits])
    {
        hits.push(Hit {
            start: i,
            end,
            detector: Detector::PaymentCard,
        });
        return;
    }
    if d.contains(Detector::Phone)
        && let Some(h) = phone(text, i)
    {
        hits.push(h);
    }
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (k, &v) in digits.iter().rev().enumerate() {
        let mut v = u32::from(v);
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10) && digits.iter().any(|&v| v != 0)
}

fn digits_at(text: &[u8], i: usize, n: usize) -> bool {
    text.len() >= i + n && text[i..i + n].iter().all(u8::is_ascii_digit)
}

fn boundary(text: &[u8], end: usize) -> bool {
    end >= text.len()
        || !(text[end].is_ascii_alphanumeric()
            || (text[end] == b'-' && end + 1 < text.len() && text[end + 1].is_ascii_digit()))
}

/// A US SSN written ddd-dd-dddd, with the ranges the SSA never issues
/// (area 000, 666 or 9xx; group 00; serial 0000) left alone.
fn ssn(text: &[u8], i: usize) -> Option<Hit> {
    if !(digits_at(text, i, 3)
        && text.get(i + 3) == Some(&b'-')
        && digits_at(text, i + 4, 2)
        && text.get(i + 6) == Some(&b'-')
        && digits_at(text, i + 7, 4)
        && boundary(text, i + 11))
    {
        return None;
    }
    let area = &text[i..i + 3];
    if area == b"000"
        || area == b"666"
        || area[0] == b'9'
        || &text[i + 4..i + 6] == b"00"
        || &text[i + 7..i + 11] == b"0000"
    {
        return None;
    }
    Some(Hit {
        start: i,
        end: i + 11,
        detector: Detector::UsSsn,
    })
}

fn ipv4(text: &[u8], i: usize) -> Option<Hit> {
    // A dot within the first four characters, or not an address.
    if !text[i..].iter().take(4).any(|&c| c == b'.') {
        return None;
    }
    let mut j = i;
    for part in 0..4 {
        let n = text[j..]
            .iter()
            .take(3)
            .take_while(|c| c.is_ascii_digit())
            .count();
        if n == 0 || (n > 1 && text[j] == b'0') {
            return None;
        }
        let v: u32 = std::str::from_utf8(&text[j..j + n]).ok()?.parse().ok()?;
        if v > 255 {
            return None;
        }
        j += n;
        if part < 3 {
            if text.get(j) != Some(&b'.') {
                return None;
            }
            j += 1;
        }
    }
    // Not part of a longer dotted number (a version, an OID).
    if j < text.len()
        && (text[j].is_ascii_digit()
            || (text[j] == b'.' && text.get(j + 1).is_some_and(u8::is_ascii_digit)))
    {
        return None;
    }
    // An optional prefix length.
    if text.get(j) == Some(&b'/') {
        let n = text[j + 1..]
            .iter()
            .take(2)
            .take_while(|c| c.is_ascii_digit())
            .count();
        if n > 0 {
            j += 1 + n;
        }
    }
    Some(Hit {
        start: i,
        end: j,
        detector: Detector::IpAddress,
    })
}

fn ipv6(text: &[u8], i: usize) -> Option<Hit> {
    // A colon within the first five characters, or not an address.
    if !text[i..].iter().take(5).any(|&c| c == b':') {
        return None;
    }
    let n = text[i..]
        .iter()
        .take(45)
        .take_while(|&&c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        .count();
    let mut candidate = &text[i..i + n];
    while candidate.last() == Some(&b'.') {
        candidate = &candidate[..candidate.len() - 1];
    }
    if candidate.iter().filter(|&&c| c == b':').count() < 2 {
        return None;
    }
    if i + candidate.len() < text.len() && text[i + candidate.len()].is_ascii_alphanumeric() {
        return None;
    }
    // "::" alone, or a time like 12:30:45, is not worth masking (nor
    // worth parsing).
    if candidate.len() < 6
        || !candidate.iter().any(|c| c.is_ascii_alphabetic())
            && !candidate.windows(2).any(|w| w == b"::")
    {
        return None;
    }
    std::str::from_utf8(candidate)
        .ok()?
        .parse::<std::net::Ipv6Addr>()
        .ok()?;
    Some(Hit {
        start: i,
        end: i + candidate.len(),
        detector: Detector::IpAddress,
    })
}

/// A phone number at `i`: `+` and 8 to 15 digits (E.164, separators
/// allowed), or a North American number with separators
/// (`(555) 123-4567`, `555-123-4567`, `555.123.4567`, `555 123 4567`).
fn phone(text: &[u8], i: usize) -> Option<Hit> {
    let sep = |c: u8| matches!(c, b' ' | b'-' | b'.' | b'(' | b')');
    if text[i] == b'+' {
        let mut digits = 0;
        let mut j = i + 1;
        let mut end = j;
        while j < text.len() && j - i < 24 {
            let c = text[j];
            if c.is_ascii_digit() {
                digits += 1;
                j += 1;
                end = j;
            } else if sep(c)
                && j + 1 < text.len()
                && (text[j + 1].is_ascii_digit() || text[j + 1] == b'(')
            {
                j += 1;
            } else if sep(c)
                && text.get(j + 1).is_some_and(|&n| sep(n))
                && text.get(j + 2).is_some_and(u8::is_ascii_digit)
            {
                // ") " between an area code and the number.
                j += 2;
            } else {
                break;
            }
        }
        return ((8..=15).contains(&digits) && boundary(text, end)).then_some(Hit {
            start: i,
            end,
            detector: Detector::Phone,
        });
    }
    // (555) 123-4567
    let next = if text[i] == b'(' {
        if !(digits_at(text, i + 1, 3) && text.get(i + 4) == Some(&b')')) {
            return None;
        }
        if text.get(i + 5) == Some(&b' ') {
            i + 6
        } else {
            i + 5
        }
    } else {
        if !digits_at(text, i, 3) {
            return None;
        }
        let s = *text.get(i + 3)?;
        if !matches!(s, b'-' | b'.' | b' ') {
            return None;
        }
        // The same separator between the last two groups.
        if !(digits_at(text, i + 4, 3) && text.get(i + 7) == Some(&s) && digits_at(text, i + 8, 4))
        {
            return None;
        }
        let end = i + 12;
        return boundary(text, end).then_some(Hit {
            start: i,
            end,
            detector: Detector::Phone,
        });
    };
    if !(digits_at(text, next, 3)
        && matches!(text.get(next + 3), Some(b'-' | b'.' | b' '))
        && digits_at(text, next + 4, 4))
    {
        return None;
    }
    let end = next + 8;
    boundary(text, end).then_some(Hit {
        start: i,
        end,
        detector: Detector::Phone,
    })
}

/// PEM private keys, from `-----BEGIN … PRIVATE KEY-----` to the matching
/// END line (or to the end of the value).
fn pem(text: &[u8], hits: &mut Vec<Hit>) {
    const BEGIN: &[u8] = b"-----BEGIN ";
    let mut from = 0;
    while let Some(k) = find_begin(&text[from..], BEGIN) {
        let start = from + k;
        let line_end =
            find_bytes(&text[start + BEGIN.len()..], b"-----").map(|e| start + BEGIN.len() + e);
        let Some(line_end) = line_end else { return };
        let label = &text[start + BEGIN.len()..line_end];
        if !label.ends_with(b"PRIVATE KEY") {
            from = line_end;
            continue;
        }
        let end = find_bytes(&text[line_end..], b"-----END ")
            .and_then(|e| {
                let e = line_end + e;
                find_bytes(&text[e + 9..], b"-----").map(|f| e + 9 + f + 5)
            })
            .unwrap_or(text.len());
        hits.push(Hit {
            start,
            end,
            detector: Detector::PemPrivateKey,
        });
        from = end;
    }
}

/// Where `needle`, which starts with five dashes, first occurs in `hay`:
/// one byte in five is looked at where there are no dashes.
fn find_begin(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        if hay[i + 4] != b'-' {
            i += 5;
        } else if hay[i..].starts_with(needle) {
            return Some(i);
        } else {
            i += 1;
        }
    }
    None
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(Detector, &str)> {
        let mut hits = Vec::new();
        find(text.as_bytes(), Detectors::all(), &mut hits);
        hits.iter()
            .map(|h| (h.detector, &text[h.start..h.end]))
            .collect()
    }

    fn one(text: &str, d: Detector, what: &str) {
        assert_eq!(found(text), vec![(d, what)], "in {text:?}");
    }

    fn nothing(text: &str) {
        assert_eq!(found(text), vec![], "in {text:?}");
    }

    #[test]
    fn emails() {
        one(
            "write to ann.lee+x@mail.example.com.",
            Detector::Email,
            "ann.lee+x@mail.example.com",
        );
        one("ann@example.org", Detector::Email, "ann@example.org");
        nothing("user@localhost");
        nothing("@handle and a@b");
        nothing("price 3@5.00");
    }

    #[test]
    fn payment_cards_need_a_valid_luhn_check() {
        one(
            "card 4111 1111 1111 1111 ok",
            Detector::PaymentCard,
            "4111 1111 1111 1111",
        );
        one(
            "4111-1111-1111-1111",
            Detector::PaymentCard,
            "4111-1111-1111-1111",
        );
        one(
            "5500005555555559",
            Detector::PaymentCard,
            "5500005555555559",
        );
        // One digit off: not a card, and not masked.
        nothing("4111 1111 1111 1112");
        nothing("order 1234567890123456");
        // A longer number is not a card inside it.
        nothing("41111111111111110000000");
    }

    #[test]
    fn ssns() {
        one("ssn: 123-45-6789", Detector::UsSsn, "123-45-6789");
        nothing("000-12-3456");
        nothing("666-12-3456");
        nothing("900-12-3456");
        nothing("123-00-4567 and 123-45-0000");
        nothing("2024-01-15");
    }

    #[test]
    fn ibans_need_a_valid_checksum() {
        one(
            "IBAN DE89370400440532013000.",
            Detector::Iban,
            "DE89370400440532013000",
        );
        one(
            "GB82 WEST 1234 5698 7654 32",
            Detector::Iban,
            "GB82 WEST 1234 5698 7654 32",
        );
        nothing("DE89370400440532013001");
        nothing("AB12 not an iban");
    }

    #[test]
    fn phones() {
        one(
            "call +1 (415) 555-2671 now",
            Detector::Phone,
            "+1 (415) 555-2671",
        );
        one("+447911123456", Detector::Phone, "+447911123456");
        one("(415) 555-2671", Detector::Phone, "(415) 555-2671");
        one("415-555-2671", Detector::Phone, "415-555-2671");
        one("tel 415.555.2671", Detector::Phone, "415.555.2671");
        nothing("total 415 items, +3 more");
        nothing("415-555.2671");
    }

    #[test]
    fn ip_addresses() {
        one(
            "from 192.168.10.1:5432",
            Detector::IpAddress,
            "192.168.10.1",
        );
        one("net 10.0.0.0/8", Detector::IpAddress, "10.0.0.0/8");
        one(
            "host 2001:db8::ff00:42:8329 up",
            Detector::IpAddress,
            "2001:db8::ff00:42:8329",
        );
        one("::ffff:10.1.2.3", Detector::IpAddress, "::ffff:10.1.2.3");
        nothing("version 1.2.3.4.5");
        nothing("256.1.1.1");
        nothing("at 12:30:45");
    }

    #[test]
    fn jwts() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJlLWhlcmU";
        one(&format!("Bearer {jwt}"), Detector::Jwt, jwt);
        nothing("eyJust.a.word");
    }

    #[test]
    fn api_keys() {
        one(
            "key=AKIAIOSFODNN7EXAMPLE",
            Detector::ApiKey,
            "AKIAIOSFODNN7EXAMPLE",
        );
        let gh = "ghp_0123456789abcdefghijABCDEFGHIJ012345";
        one(gh, Detector::ApiKey, gh);
        let stripe = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";
        one(stripe, Detector::ApiKey, stripe);
        nothing("AKIA is a prefix");
    }

    #[test]
    fn high_entropy_tokens() {
        let token = "q8Vz3LmN0pR7sT2uW5xY9aB4cD6eF1gH";
        one(&format!("token {token} end"), Detector::HighEntropy, token);
        // Identifiers, UUIDs, hex digests and prose are not secrets.
        nothing("550e8400-e29b-41d4-a716-446655440000");
        nothing("d41d8cd98f00b204e9800998ecf8427ed41d8cd9");
        nothing("getUserAccountSettingsForOrganization2");
        nothing("the quick brown fox jumps over the lazy dog");
    }

    #[test]
    fn password_hashes() {
        let bcrypt = "$2b$12$KIXQJ9Ct3fZ8z5d6hQeYxOq1r0mWn5sY7aPzW7cKqL3v1bN9uE2mS";
        one(bcrypt, Detector::PasswordHash, bcrypt);
        let argon = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
        one(argon, Detector::PasswordHash, argon);
        let md5 = "md5a3556571e93b0d20722ba62be61e8c2d";
        one(md5, Detector::PasswordHash, md5);
        let scram = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy";
        one(scram, Detector::PasswordHash, scram);
        nothing("$2b$ is bcrypt's prefix");
    }

    #[test]
    fn pem_private_keys() {
        let key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----";
        one(&format!("k: {key} done"), Detector::PemPrivateKey, key);
        nothing("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----");
        // Wherever the marker starts, after dashes or not.
        for prefix in ["", "a", "ab", "a-b", "a--c", "x----", "-", "key=", "\\n"] {
            one(&format!("{prefix}{key}"), Detector::PemPrivateKey, key);
        }
    }

    #[test]
    fn several_in_one_value_in_order() {
        let text = "ann@example.org paid with 4111 1111 1111 1111 from 10.1.2.3";
        assert_eq!(
            found(text),
            vec![
                (Detector::Email, "ann@example.org"),
                (Detector::PaymentCard, "4111 1111 1111 1111"),
                (Detector::IpAddress, "10.1.2.3"),
            ]
        );
    }

    #[test]
    fn only_the_chosen_detectors_run() {
        let mut hits = Vec::new();
        let set: Detectors = [Detector::UsSsn].into_iter().collect();
        find(b"ann@example.org 123-45-6789", set, &mut hits);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].detector, Detector::UsSsn);
    }

    #[test]
    fn ordinary_values_have_no_hits() {
        // What the benchmark's `no_hits` rows hold: nothing here is masked.
        for i in [0usize, 7, 123, 4999, 65535] {
            for value in [
                format!("Order {i} for customer account {}", i * 7 % 1000),
                format!(
                    "{} Market Street, Suite {}, San Francisco CA",
                    100 + i % 900,
                    i % 50
                ),
                "Please leave the parcel at the front desk, thanks! Fragile items inside.".into(),
                format!("{}.{:02}", i % 5000, i % 100),
                format!(
                    "2026-11-{:02} 12:{:02}:{:02}+00",
                    1 + i % 28,
                    i % 60,
                    (i * 7) % 60
                ),
                format!("3f2504e0-4f89-11d3-9a0c-{i:012x}"),
                "v1.2.3 build 20261107, see docs/setup.md#tls and RFC 5322".into(),
            ] {
                nothing(&value);
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for d in Detector::ALL {
            assert_eq!(Detector::from_name(d.name()), Some(d));
        }
        assert_eq!(Detector::from_name("nope"), None);
    }
}
