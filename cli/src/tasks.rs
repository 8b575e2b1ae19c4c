//! Synthetic long-context tasks in the spirit of RULER, generated from a
//! seed: nothing is downloaded.
//!
//! Every task hides one or more *needles* in a *haystack* of filler text
//! (built-in sentences, or the sentences of a text file) and asks a question
//! about them after the document:
//!
//! - [`TaskKind::Passkey`]: one pass key, asked for.
//! - [`TaskKind::MultiKey`]: several labelled needles ("one of the special
//!   magic numbers for `<word>` is: `NNNNNNN`"); one label is asked for.
//! - [`TaskKind::MultiValue`]: one label with several values (plus other
//!   labels as distractors); all its values are asked for.
//! - [`TaskKind::VarTrack`]: a chain of assignments (`VAR X = 12345.` then
//!   `VAR Y = X.` ...); every variable that holds the asked value is
//!   asked for. With the question last, the answer is opened for the model
//!   as RULER does ([`TaskInstance::answer_prefix`]).
//!
//! The *depth* of an instance (0 = start of the document, 1 = its end) is
//! where the asked needles sit; distractors are spread at random. At least
//! one filler sentence always follows the last needle, and more than an
//! observation window's worth of text (the end of the document, the answer
//! instructions and the question) follows it, so every needle lies before
//! the window.
//!
//! The [`PromptLayout`] decides what the observation window sees. The
//! default puts the question last, as RULER does, so the window holds the
//! question itself ([`PromptLayout::QuestionLast`]). The stress layout ends
//! with a generic answer-format instruction longer than the window, so the
//! window holds no word of what is asked
//! ([`PromptLayout::InstructionsLast`]): SnapKV must then find the facts
//! from how the prompt ends, not from the question's words.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// The kinds of task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskKind {
    /// Single needle: a pass key.
    Passkey,
    /// Many labelled needles, one label asked for.
    MultiKey,
    /// One label with several values, all asked for.
    MultiValue,
    /// Chains of variable assignments; which variables hold a value.
    VarTrack,
}

impl TaskKind {
    /// Every task, in report order.
    pub const ALL: [TaskKind; 4] = [
        TaskKind::Passkey,
        TaskKind::MultiKey,
        TaskKind::MultiValue,
        TaskKind::VarTrack,
    ];

    /// The name the CLI and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Passkey => "passkey",
            TaskKind::MultiKey => "multikey",
            TaskKind::MultiValue => "multivalue",
            TaskKind::VarTrack => "vartrack",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TaskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TaskKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown task {s:?} (passkey, multikey, multivalue, vartrack)"))
    }
}

/// Sizes of the tasks' needle sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSizes {
    /// Labels in a multi-key document (the asked one included).
    pub keys: usize,
    /// Values of the asked label in a multi-value document.
    pub values: usize,
    /// Distractor labels in a multi-value document.
    pub value_distractors: usize,
    /// Variables per chain in a variable-tracking document.
    pub chain: usize,
    /// Chains in a variable-tracking document (one asked, the others
    /// distract). One by default, RULER's usual setting: with a second chain
    /// and the question last, Qwen 0.5B's full cache mixed the two up (40% of
    /// the names on seed 1, when this was 2), where with one it finds 97.8%
    /// (seeds 1-3, `results/lookahead/gqa-pool-seeds-1-3`).
    pub chains: usize,
}

impl Default for TaskSizes {
    fn default() -> Self {
        TaskSizes {
            keys: 8,
            values: 4,
            value_distractors: 4,
            chain: 5,
            chains: 1,
        }
    }
}

/// The order of the question and the answer-format instructions after the
/// document.
///
/// SnapKV scores the prompt by the attention of its last tokens, so what
/// those tokens say matters: with the question last the observation window
/// sees what is asked (the label, the value); with a long instruction last
/// it sees only how to answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PromptLayout {
    /// The instructions, then the question as the last sentence of the user
    /// message (RULER's layout; the default).
    #[default]
    QuestionLast,
    /// The question, then an answer-format instruction of more than 32
    /// tokens: a 32-token window holds no word of the question (a stress
    /// test for SnapKV).
    InstructionsLast,
}

impl PromptLayout {
    /// Both layouts.
    pub const ALL: [PromptLayout; 2] = [PromptLayout::QuestionLast, PromptLayout::InstructionsLast];

    /// The name the CLI and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            PromptLayout::QuestionLast => "question-last",
            PromptLayout::InstructionsLast => "instructions-last",
        }
    }
}

impl fmt::Display for PromptLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PromptLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PromptLayout::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| format!("unknown prompt layout {s:?} (question-last, instructions-last)"))
    }
}

/// What to generate: a task, the target length of the user message in
/// tokens, the depth of the asked needles, the seed and the prompt layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskSpec {
    /// The task.
    pub kind: TaskKind,
    /// Target length of the user message in tokens (the filler is sized to
    /// reach it; the chat template adds a few more).
    pub length: usize,
    /// Where the asked needles sit, 0 (start) to 1 (end of the document).
    pub depth: f64,
    /// Generator seed.
    pub seed: u64,
    /// Needle-set sizes.
    pub sizes: TaskSizes,
    /// The order of question and instructions after the document.
    pub layout: PromptLayout,
}

impl TaskSpec {
    /// A spec with the default needle-set sizes and layout.
    pub fn new(kind: TaskKind, length: usize, depth: f64, seed: u64) -> Self {
        TaskSpec {
            kind,
            length,
            depth,
            seed,
            sizes: TaskSizes::default(),
            layout: PromptLayout::default(),
        }
    }
}

/// A generated task instance.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskInstance {
    /// What it was generated from.
    pub spec: TaskSpec,
    /// The user message: introduction, document, then the request (question
    /// and answer instructions, in the spec's layout).
    pub user_message: String,
    /// The request after the document: question and answer instructions
    /// (the end of `user_message`).
    pub question: String,
    /// The question sentence(s) alone, without the answer instructions.
    pub asked: String,
    /// Every expected answer string; all must appear in the output.
    pub answers: Vec<String>,
    /// What the needles the question does not ask about state: the other
    /// labels' numbers (multi-key, multi-value) and the other chains'
    /// variables (variable tracking). An answer that holds one copied a
    /// distractor.
    pub distractors: Vec<String>,
    /// Every needle sentence, in document order.
    pub needles: Vec<String>,
    /// Byte offset in `user_message` just past the last needle.
    pub last_needle_end: usize,
    /// Byte offset in `user_message` where the request (`question`) starts.
    pub question_start: usize,
    /// Words that open the assistant's answer, after the chat template's
    /// assistant header (empty for most tasks). Part of the prompt, so of the
    /// observation window; the model's output continues them.
    pub answer_prefix: String,
    /// Further questions about the same document, for the question-agnostic
    /// protocol ([`TaskInstance::questions`]): the other labels of a
    /// multi-key or multi-value document, the other chains of a
    /// variable-tracking one. Empty for the passkey task.
    pub follow_ups: Vec<FollowUp>,
}

/// A further question about a task's document: what it asks, how the
/// answer is to be given, and what answers it.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUp {
    /// The question sentence(s).
    pub asked: String,
    /// The answer instructions in the question-last layout's words.
    pub long: &'static str,
    /// The answer instructions in the instructions-last layout's words.
    pub short: &'static str,
    /// Every expected answer string.
    pub answers: Vec<String>,
    /// What the needles it does not ask about state.
    pub distractors: Vec<String>,
    /// Words that open the assistant's answer.
    pub answer_prefix: String,
}

/// The request after the document in `layout`: the question and the answer
/// instructions.
fn request(layout: PromptLayout, asked: &str, short: &str, long: &str) -> String {
    match layout {
        PromptLayout::QuestionLast => format!("{ANSWER_RULES} {long}.\n\nQuestion: {asked}"),
        PromptLayout::InstructionsLast => format!("Question: {asked}{ANSWER_RULES_AFTER} {short}."),
    }
}

impl TaskInstance {
    /// Fraction of the expected answers found in `output` (each as a whole
    /// word: not part of a longer run of letters or digits).
    pub fn score(&self, output: &str) -> f64 {
        self.score_beyond("", output).unwrap_or(0.0)
    }

    /// [`score`](Self::score) over the expected answers that `start` (the
    /// beginning of `output`) does not already hold: the fraction of them
    /// found in `output`. `None` when `start` holds every one. It scores
    /// what an answer found beyond a given beginning, e.g. one written by
    /// another cache.
    pub fn score_beyond(&self, start: &str, output: &str) -> Option<f64> {
        let rest: Vec<&String> = self.answers.iter().filter(|a| !contains_word(start, a)).collect();
        if rest.is_empty() {
            return None;
        }
        let found = rest.iter().filter(|a| contains_word(output, a)).count();
        Some(found as f64 / rest.len() as f64)
    }

    /// Byte ranges in `user_message` of the needles the question asks
    /// about: those that state an expected answer (for variable tracking,
    /// every assignment of the asked chain), in document order.
    pub fn asked_needle_spans(&self) -> Vec<Range<usize>> {
        self.needle_spans(true)
    }

    /// Byte ranges in `user_message` of the other needles (the
    /// distractors), in document order; empty for the passkey task.
    pub fn unasked_needle_spans(&self) -> Vec<Range<usize>> {
        self.needle_spans(false)
    }

    fn needle_spans(&self, asked: bool) -> Vec<Range<usize>> {
        let mut from = 0;
        let mut spans = Vec::new();
        for needle in &self.needles {
            let Some(at) = self.user_message[from..].find(needle.as_str()).map(|i| from + i) else {
                continue;
            };
            from = at + needle.len();
            if self.answers.iter().any(|a| contains_word(needle, a)) == asked {
                spans.push(at..from);
            }
        }
        spans
    }

    /// How many of the [`distractors`](Self::distractors) `output` holds
    /// (each as a whole word).
    pub fn distractors_in(&self, output: &str) -> usize {
        self.distractors.iter().filter(|d| contains_word(output, d)).count()
    }

    /// The document before the request: the same text for every question.
    pub fn document(&self) -> &str {
        &self.user_message[..self.question_start]
    }

    /// Every question about this document, this instance's first and then
    /// its [`follow_ups`](Self::follow_ups), each as an instance of its own:
    /// the same document, that question's request, answers, distractors and
    /// answer opening (and no follow-ups).
    pub fn questions(&self) -> Vec<TaskInstance> {
        let first = TaskInstance {
            follow_ups: Vec::new(),
            ..self.clone()
        };
        let mut all = vec![first];
        for f in &self.follow_ups {
            let question = request(self.spec.layout, &f.asked, f.short, f.long);
            all.push(TaskInstance {
                user_message: format!("{}{question}", self.document()),
                question,
                asked: f.asked.clone(),
                answers: f.answers.clone(),
                distractors: f.distractors.clone(),
                answer_prefix: f.answer_prefix.clone(),
                follow_ups: Vec::new(),
                ..self.clone()
            });
        }
        all
    }
}

/// Whether `needle` occurs in `text` with no letter or digit right before or
/// after it.
pub fn contains_word(text: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return false;
    }
    let mut from = 0;
    while let Some(i) = text[from..].find(needle) {
        let start = from + i;
        let end = start + needle.len();
        let before = text[..start].chars().next_back();
        let after = text[end..].chars().next();
        if !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric) {
            return true;
        }
        from = start + needle.chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// A small deterministic generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// A uniform float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A decimal number of exactly `digits` digits (no leading zero).
    pub fn number(&mut self, digits: u32) -> String {
        let lo = 10u64.pow(digits - 1);
        (lo + self.below((9 * lo) as usize) as u64).to_string()
    }
}

/// Where filler text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Haystack {
    /// Sentences generated from built-in word lists (no digits).
    Builtin,
    /// The sentences of a real text, read in order from a seeded offset.
    Text {
        /// A short name for reports (e.g. the file name).
        name: String,
        /// The text's sentences.
        sentences: Vec<String>,
    },
}

impl Haystack {
    /// A haystack from a text: split into sentences (at `.`, `!` or `?`
    /// followed by white space, and at blank lines), white space collapsed.
    ///
    /// # Errors
    /// When the text holds fewer than 10 sentences.
    pub fn from_text(name: impl Into<String>, text: &str) -> Result<Self, String> {
        let sentences = split_sentences(text);
        if sentences.len() < 10 {
            return Err(format!(
                "a haystack needs at least 10 sentences, the text has {}",
                sentences.len()
            ));
        }
        Ok(Haystack::Text {
            name: name.into(),
            sentences,
        })
    }

    /// The name reports use: `builtin` or the text's name.
    pub fn name(&self) -> &str {
        match self {
            Haystack::Builtin => "builtin",
            Haystack::Text { name, .. } => name,
        }
    }

    /// Filler sentences until their token count reaches `tokens` (at least
    /// two sentences).
    fn fill(&self, rng: &mut Rng, tokens: usize, count: &mut dyn FnMut(&str) -> usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut total = 0;
        let mut next = match self {
            Haystack::Builtin => 0,
            Haystack::Text { sentences, .. } => rng.below(sentences.len()),
        };
        while total < tokens || out.len() < 2 {
            let s = match self {
                Haystack::Builtin => builtin_sentence(rng),
                Haystack::Text { sentences, .. } => {
                    let s = sentences[next % sentences.len()].clone();
                    next += 1;
                    s
                }
            };
            total += count(&s);
            out.push(s);
        }
        out
    }
}

fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let flat = para.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut start = 0;
        let bytes = flat.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            if matches!(b, b'.' | b'!' | b'?') && bytes.get(i + 1) == Some(&b' ') {
                out.push(flat[start..=i].trim().to_string());
                start = i + 2;
            }
        }
        if start < flat.len() {
            out.push(flat[start..].trim().to_string());
        }
    }
    out.retain(|s| s.chars().any(char::is_alphabetic));
    out
}

const SUBJECTS: &[&str] = &[
    "The old harbour town",
    "A quiet librarian",
    "The river near the mill",
    "Every autumn the farmers",
    "The village committee",
    "A travelling musician",
    "The small museum",
    "Children from the valley",
    "The northern forest",
    "A patient engineer",
    "The baker on the corner",
    "Our neighbours",
    "The mountain railway",
    "A young painter",
    "The city council",
    "The lighthouse keeper",
];
const PREDICATES: &[&str] = &[
    "repaired the wooden bridge",
    "counted the boats in the bay",
    "wrote a long letter to a friend",
    "planted apple trees along the road",
    "talked about the weather for hours",
    "opened the doors to curious visitors",
    "collected stories from older people",
    "painted the fence a pale shade of blue",
    "watched the clouds drift over the hills",
    "carried baskets of bread to the square",
    "studied old maps of the coastline",
    "sang quietly while the kettle boiled",
    "mended nets that the storm had torn",
    "cleaned the windows of the station",
    "argued politely about the best route home",
    "kept a careful diary of small events",
];
const ENDINGS: &[&str] = &[
    "before the first snow arrived",
    "after the market had closed",
    "without saying a single word",
    "while the church bells were ringing",
    "as the tide slowly came in",
    "on a grey and windy afternoon",
    "because nobody else remembered to",
    "until the lamps were lit at dusk",
    "during the long summer holidays",
    "with more patience than anyone expected",
    "in the shade of the tall chestnut trees",
    "just as the evening train departed",
];

fn builtin_sentence(rng: &mut Rng) -> String {
    format!(
        "{} {} {}.",
        SUBJECTS[rng.below(SUBJECTS.len())],
        PREDICATES[rng.below(PREDICATES.len())],
        ENDINGS[rng.below(ENDINGS.len())]
    )
}

const LABELS: &[&str] = &[
    "amber", "falcon", "harbor", "violet", "granite", "meadow", "copper", "lantern", "orchid", "thunder", "saffron",
    "glacier", "walnut", "cobalt", "willow", "ember", "quartz", "juniper", "marble", "pepper", "canyon", "velvet",
    "comet", "tundra", "maple", "sapphire", "raven", "citrus", "bramble", "nectar", "pylon", "fjord",
];

const INTRO: &str =
    "Read the document below carefully. Some sentences in it hold facts that a question at the end asks about.";

/// How to answer, before the question ([`PromptLayout::QuestionLast`]).
const ANSWER_RULES: &str = "Answer the question below using only the document above, not anything you may know from \
                            elsewhere. Do not explain your answer or add any other words: reply with nothing but";

/// How to answer, after the question ([`PromptLayout::InstructionsLast`]).
const ANSWER_RULES_AFTER: &str = " Answer using only the document above, not anything you may know from elsewhere, \
                                  and do not explain your answer or add any other words. Reply with nothing but";

/// One needle sentence and where it goes.
struct Placed {
    text: String,
    depth: f64,
}

/// Generates a task instance. `count` returns the token count of a piece of
/// text (the model's tokenizer; any monotone estimate works for tests).
///
/// The same spec and haystack always give the same instance.
pub fn generate(spec: &TaskSpec, haystack: &Haystack, count: &mut dyn FnMut(&str) -> usize) -> TaskInstance {
    let mut rng = Rng::new(
        spec.seed
            ^ (spec.kind as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (spec.length as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
            ^ spec.depth.to_bits().rotate_left(17),
    );
    let depth = spec.depth.clamp(0.0, 1.0);
    let sizes = spec.sizes;
    let mut labels: Vec<&str> = LABELS.to_vec();
    shuffle(&mut labels, &mut rng);
    // Each task says what it asks (`asked`) and how the answer is to be
    // given, in the words of each layout (`short`, `long`).
    let mut answer_prefix = String::new();
    let mut distractors = Vec::new();
    // Further questions about the same document take no draw of `rng`:
    // the document and the first question are the same with or without them.
    let mut follow_ups = Vec::new();
    let (needles, asked, short, long, answers) = match spec.kind {
        TaskKind::Passkey => {
            let v = rng.number(7);
            let needles = vec![Placed {
                text: format!("The pass key is {v}. Remember it. {v} is the pass key."),
                depth,
            }];
            let q = "What is the pass key hidden in the document?".to_string();
            (needles, q, "the pass key, a number", "the pass key, a number", vec![v])
        }
        TaskKind::MultiKey => {
            let n = sizes.keys.clamp(1, LABELS.len());
            let mut needles = Vec::new();
            let mut answer = String::new();
            let mut values = Vec::new();
            for (i, label) in labels.iter().take(n).enumerate() {
                let v = rng.number(7);
                values.push(v.clone());
                let d = if i == 0 { depth } else { rng.unit() };
                if i == 0 {
                    answer.clone_from(&v);
                } else {
                    distractors.push(v.clone());
                }
                needles.push(Placed {
                    text: format!("One of the special magic numbers for {label} is: {v}."),
                    depth: d,
                });
            }
            let q = key_question(labels[0]);
            for (i, label) in labels.iter().enumerate().take(n.min(MAX_QUESTIONS)).skip(1) {
                follow_ups.push(FollowUp {
                    asked: key_question(label),
                    long: "the number asked for",
                    short: "that number",
                    answers: vec![values[i].clone()],
                    distractors: values.iter().filter(|v| **v != values[i]).cloned().collect(),
                    answer_prefix: String::new(),
                });
            }
            (needles, q, "that number", "the number asked for", vec![answer])
        }
        TaskKind::MultiValue => {
            let n = sizes.values.max(1);
            let mut needles = Vec::new();
            let mut answers = Vec::new();
            for i in 0..n {
                let v = rng.number(7);
                let d = (depth + (i as f64 - (n as f64 - 1.0) / 2.0) * 0.03).clamp(0.0, 1.0);
                needles.push(Placed {
                    text: format!("One of the special magic numbers for {} is: {v}.", labels[0]),
                    depth: d,
                });
                answers.push(v);
            }
            let mut others = Vec::new();
            for label in labels
                .iter()
                .skip(1)
                .take(sizes.value_distractors.min(LABELS.len() - 1))
            {
                let v = rng.number(7);
                needles.push(Placed {
                    text: format!("One of the special magic numbers for {label} is: {v}."),
                    depth: rng.unit(),
                });
                others.push((*label, v.clone()));
                distractors.push(v);
            }
            // The other labels have one number each: asked like multi-key's.
            for (label, v) in others.iter().take(MAX_QUESTIONS - 1) {
                follow_ups.push(FollowUp {
                    asked: key_question(label),
                    long: "the number asked for",
                    short: "that number",
                    answers: vec![v.clone()],
                    distractors: answers
                        .iter()
                        .chain(distractors.iter().filter(|d| *d != v))
                        .cloned()
                        .collect(),
                    answer_prefix: String::new(),
                });
            }
            let q = format!(
                "What are all the special magic numbers for {} mentioned in the document? There are {n} of them.",
                labels[0]
            );
            (
                needles,
                q,
                "those numbers, separated by commas",
                "the numbers asked for, separated by commas",
                answers,
            )
        }
        TaskKind::VarTrack => {
            let len = sizes.chain.max(1);
            let mut names = Vec::new();
            while names.len() < len * sizes.chains.max(1) {
                let name: String = (0..5).map(|_| (b'A' + rng.below(26) as u8) as char).collect();
                if !names.contains(&name) && name != "VAR" {
                    names.push(name);
                }
            }
            let mut needles = Vec::new();
            let mut answers = Vec::new();
            let mut target_value = String::new();
            let mut values: Vec<String> = Vec::new();
            for c in 0..sizes.chains.max(1) {
                let mut value = rng.number(5);
                while values.contains(&value) {
                    value = rng.number(5);
                }
                values.push(value.clone());
                let chain = &names[c * len..(c + 1) * len];
                let mut depths: Vec<f64> = if c == 0 {
                    (0..len)
                        .map(|i| (depth + (i as f64 - (len as f64 - 1.0) / 2.0) * 0.03).clamp(0.0, 1.0))
                        .collect()
                } else {
                    (0..len).map(|_| rng.unit()).collect()
                };
                depths.sort_by(f64::total_cmp);
                for (i, name) in chain.iter().enumerate() {
                    let rhs = if i == 0 { value.clone() } else { chain[i - 1].clone() };
                    needles.push(Placed {
                        text: format!("VAR {name} = {rhs}."),
                        depth: depths[i],
                    });
                }
                if c == 0 {
                    answers = chain.to_vec();
                    target_value = value;
                } else {
                    distractors.extend(chain.iter().cloned());
                }
            }
            let q = chain_question(&target_value, len);
            answer_prefix = chain_answer_prefix(spec.layout, &target_value, len);
            for (c, value) in values.iter().enumerate().take(MAX_QUESTIONS).skip(1) {
                let chain = &names[c * len..(c + 1) * len];
                follow_ups.push(FollowUp {
                    asked: chain_question(value, len),
                    long: "the names of the variables asked for, separated by commas",
                    short: "their names, separated by commas",
                    answers: chain.to_vec(),
                    distractors: names.iter().filter(|n| !chain.contains(n)).cloned().collect(),
                    answer_prefix: chain_answer_prefix(spec.layout, value, len),
                });
            }
            (
                needles,
                q,
                "their names, separated by commas",
                "the names of the variables asked for, separated by commas",
                answers,
            )
        }
    };

    let question = request(spec.layout, &asked, short, long);
    let fixed = count(INTRO) + count(&question) + needles.iter().map(|n| count(&n.text) + 1).sum::<usize>() + 4;
    let filler = haystack.fill(&mut rng, spec.length.saturating_sub(fixed), count);
    let n = filler.len();
    // Insert each needle before filler sentence `idx <= n - 1`, so at least
    // one filler sentence follows every needle. Stable: needles with the
    // same index keep their order (chains stay in order).
    let mut placed: Vec<(usize, usize)> = needles
        .iter()
        .enumerate()
        .map(|(i, p)| (((p.depth * n as f64).round() as usize).min(n - 1), i))
        .collect();
    placed.sort();
    let mut doc = String::new();
    let mut needle_order = Vec::new();
    let mut last_needle_end = 0;
    let mut next = 0;
    let head = format!("{INTRO}\n\n<document>\n");
    for (s, sentence) in filler.iter().enumerate() {
        while next < placed.len() && placed[next].0 == s {
            let text = &needles[placed[next].1].text;
            push_sentence(&mut doc, text);
            last_needle_end = head.len() + doc.len();
            needle_order.push(text.clone());
            next += 1;
        }
        push_sentence(&mut doc, sentence);
        if s % 8 == 7 {
            doc.push('\n');
        }
    }
    let body = format!("{head}{}\n</document>\n\n", doc.trim_end());
    let question_start = body.len();
    TaskInstance {
        spec: *spec,
        user_message: format!("{body}{question}"),
        question,
        asked,
        answers,
        distractors,
        needles: needle_order,
        last_needle_end,
        question_start,
        answer_prefix,
        follow_ups,
    }
}

/// The most questions a document gets in the question-agnostic protocol
/// (the first included).
pub const MAX_QUESTIONS: usize = 4;

/// The question for one label of a multi-key (or multi-value) document.
fn key_question(label: &str) -> String {
    format!("What is the special magic number for {label} mentioned in the document?")
}

/// The question for the chain of `len` variables that ends in `value`.
fn chain_question(value: &str, len: usize) -> String {
    format!(
        "Which variables in the document are assigned the value {value}, directly or through other variables? There are {len} of them."
    )
}

/// The words that open a variable-tracking answer. With the question last,
/// Qwen 0.5B's full cache answered with the filler's subjects ("lighthouse
/// keeper"): 7% of the names on seeds 4-5. Opening its answer as RULER does
/// gives it the kind of name it is to list.
fn chain_answer_prefix(layout: PromptLayout, value: &str, len: usize) -> String {
    match layout {
        PromptLayout::QuestionLast => format!(
            "According to the chains of variable assignment in the document, {len} variables are assigned the value {value}. They are: VAR"
        ),
        PromptLayout::InstructionsLast => String::new(),
    }
}

fn push_sentence(doc: &mut String, s: &str) {
    if !doc.is_empty() && !doc.ends_with('\n') {
        doc.push(' ');
    }
    doc.push_str(s);
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn spec(kind: TaskKind, length: usize, depth: f64, seed: u64) -> TaskSpec {
        TaskSpec::new(kind, length, depth, seed)
    }

    fn text_haystack() -> Haystack {
        let text = (0..40)
            .map(|i| format!("Sentence number {i} talks about rivers and hills. It goes on!\n\nA new paragraph {i}?"))
            .collect::<Vec<_>>()
            .join(" ");
        Haystack::from_text("test", &text).unwrap()
    }

    #[test]
    fn same_seed_same_instance_other_seed_other_instance() {
        for kind in TaskKind::ALL {
            for hay in [Haystack::Builtin, text_haystack()] {
                let a = generate(&spec(kind, 800, 0.5, 7), &hay, &mut words);
                let b = generate(&spec(kind, 800, 0.5, 7), &hay, &mut words);
                let c = generate(&spec(kind, 800, 0.5, 8), &hay, &mut words);
                assert_eq!(a, b, "{kind}");
                assert_ne!(a.answers, c.answers, "{kind}");
            }
        }
    }

    #[test]
    fn every_needle_is_in_the_document_before_the_question() {
        for (kind, layout) in TaskKind::ALL
            .into_iter()
            .flat_map(|k| PromptLayout::ALL.map(|l| (k, l)))
        {
            for depth in [0.0, 0.1, 0.5, 0.9, 1.0] {
                for seed in 0..5 {
                    let spec = TaskSpec {
                        layout,
                        ..spec(kind, 600, depth, seed)
                    };
                    let t = generate(&spec, &Haystack::Builtin, &mut words);
                    assert!(t.user_message.ends_with(&t.question));
                    assert_eq!(&t.user_message[t.question_start..], t.question);
                    assert!(t.last_needle_end < t.question_start);
                    for n in &t.needles {
                        let at = t.user_message.find(n.as_str()).expect("needle in message");
                        assert!(at + n.len() <= t.last_needle_end, "{kind} {depth}");
                    }
                    // A filler sentence follows the last needle inside the document.
                    let gap = &t.user_message[t.last_needle_end..t.question_start];
                    assert!(words(gap) >= 5, "{kind} {depth}: {gap:?}");
                    // More than a 32-token window follows the last needle.
                    let after = &t.user_message[t.last_needle_end..];
                    assert!(words(after) >= 30, "{kind} {layout}: {after:?}");
                    assert!(t.question.contains(&t.asked));
                }
            }
        }
    }

    #[test]
    fn the_layout_decides_what_ends_the_prompt() {
        for kind in TaskKind::ALL {
            let at = |layout| {
                let spec = TaskSpec {
                    layout,
                    ..spec(kind, 800, 0.5, 3)
                };
                generate(&spec, &Haystack::Builtin, &mut words)
            };
            let last = at(PromptLayout::QuestionLast);
            let asked = format!("Question: {}", last.asked);
            assert!(last.user_message.ends_with(&asked), "{kind}: {}", last.question);
            // The question is short enough for a 32-token window to hold it whole.
            assert!(words(&asked) < 25, "{kind}: {asked}");
            let instructions = at(PromptLayout::InstructionsLast);
            assert_eq!(instructions.asked, last.asked);
            assert!(instructions.question.starts_with(&asked), "{kind}");
            // What follows the question is longer than a 32-token window.
            assert!(words(&instructions.question[asked.len()..]) >= 30, "{kind}");
            // The same needles and answers either way.
            assert_eq!(instructions.answers, last.answers);
            let sorted = |t: &TaskInstance| {
                let mut n = t.needles.clone();
                n.sort();
                n
            };
            assert_eq!(sorted(&instructions), sorted(&last));
        }
        assert_eq!("question-last".parse(), Ok(PromptLayout::QuestionLast));
        assert_eq!("instructions-last".parse(), Ok(PromptLayout::InstructionsLast));
        assert!("other".parse::<PromptLayout>().is_err());
    }

    #[test]
    fn follow_up_questions_ask_about_the_same_document() {
        let sizes = TaskSizes {
            chains: 3,
            ..TaskSizes::default()
        };
        let expected = [
            (TaskKind::Passkey, 1),
            (TaskKind::MultiKey, MAX_QUESTIONS),
            (TaskKind::MultiValue, MAX_QUESTIONS),
            (TaskKind::VarTrack, 3),
        ];
        for (kind, n) in expected {
            for layout in PromptLayout::ALL {
                let spec = TaskSpec {
                    sizes,
                    layout,
                    ..spec(kind, 900, 0.5, 4)
                };
                let t = generate(&spec, &Haystack::Builtin, &mut words);
                let questions = t.questions();
                assert_eq!(questions.len(), n, "{kind} {layout}");
                let first = &questions[0];
                assert_eq!((&first.user_message, &first.answers), (&t.user_message, &t.answers));
                let mut all_answers = Vec::new();
                for q in &questions {
                    assert_eq!(q.document(), t.document(), "{kind}");
                    assert!(q.user_message.ends_with(&q.question));
                    assert!(q.question.contains(&q.asked));
                    assert!(q.follow_ups.is_empty());
                    // Every answer is stated by a needle of the document; no
                    // distractor is an answer.
                    for a in &q.answers {
                        assert!(q.needles.iter().any(|n| contains_word(n, a)), "{kind}: {a}");
                        assert!(contains_word(q.document(), a));
                    }
                    assert!(q.distractors.iter().all(|d| !q.answers.contains(d)), "{kind}");
                    assert!(!q.asked_needle_spans().is_empty());
                    all_answers.push(q.answers.clone());
                }
                all_answers.dedup();
                assert_eq!(all_answers.len(), n, "{kind}: the questions ask different things");
                if kind == TaskKind::VarTrack && layout == PromptLayout::QuestionLast {
                    for q in &questions {
                        assert!(q.answer_prefix.ends_with("They are: VAR"));
                        assert!(q
                            .asked
                            .contains(q.answer_prefix.split("the value ").nth(1).unwrap()[..5].trim()));
                    }
                }
            }
        }
    }

    #[test]
    fn length_is_reached_and_not_overshot_much() {
        for kind in TaskKind::ALL {
            for length in [300, 1000, 4000] {
                let t = generate(&spec(kind, length, 0.5, 1), &Haystack::Builtin, &mut words);
                let n = words(&t.user_message);
                assert!(n >= length - length / 20 && n <= length + 40, "{kind} {length}: {n}");
            }
        }
    }

    #[test]
    fn depth_moves_the_asked_needle() {
        let at = |depth: f64| {
            let t = generate(&spec(TaskKind::Passkey, 2000, depth, 3), &Haystack::Builtin, &mut words);
            let pos = t.user_message.find(&t.needles[0]).unwrap();
            pos as f64 / t.question_start as f64
        };
        assert!(at(0.1) < 0.2);
        assert!((at(0.5) - 0.5).abs() < 0.1);
        assert!(at(0.9) > 0.8);
    }

    #[test]
    fn answers_are_checkable() {
        for kind in TaskKind::ALL {
            let t = generate(&spec(kind, 500, 0.3, 11), &Haystack::Builtin, &mut words);
            let all = t.answers.join(", ");
            assert_eq!(t.score(&all), 1.0, "{kind}");
            assert_eq!(t.score("I do not know."), 0.0, "{kind}");
            if t.answers.len() > 1 {
                assert!((t.score(&t.answers[0]) - 1.0 / t.answers.len() as f64).abs() < 1e-12);
            }
            // Each answer is stated by a needle.
            for a in &t.answers {
                assert!(t.needles.iter().any(|n| contains_word(n, a)), "{kind}: {a}");
            }
            // The asked needles: one per expected value (a chain's
            // assignments for variable tracking), each stating an answer.
            let spans = t.asked_needle_spans();
            assert_eq!(spans.len(), t.answers.len(), "{kind}");
            for span in &spans {
                let text = &t.user_message[span.clone()];
                assert!(t.needles.iter().any(|n| n == text), "{kind}: {text:?}");
                assert!(t.answers.iter().any(|a| contains_word(text, a)), "{kind}: {text:?}");
            }
            assert!(spans.windows(2).all(|w| w[0].end <= w[1].start));
        }
    }

    #[test]
    fn distractors_are_what_the_unasked_needles_state() {
        let sizes = TaskSizes {
            chains: 2,
            ..TaskSizes::default()
        };
        for kind in TaskKind::ALL {
            let t = generate(
                &TaskSpec {
                    sizes,
                    ..spec(kind, 800, 0.4, 5)
                },
                &Haystack::Builtin,
                &mut words,
            );
            let asked = t.asked_needle_spans();
            let unasked = t.unasked_needle_spans();
            assert_eq!(asked.len() + unasked.len(), t.needles.len(), "{kind}");
            for span in &unasked {
                let text = &t.user_message[span.clone()];
                assert!(t.answers.iter().all(|a| !contains_word(text, a)), "{kind}: {text:?}");
                assert!(t.distractors.iter().any(|d| contains_word(text, d)), "{kind}: {text:?}");
            }
            assert!(t.distractors.iter().all(|d| !t.answers.contains(d)), "{kind}");
            assert_eq!(t.distractors_in(&t.answers.join(", ")), 0, "{kind}");
            assert_eq!(
                t.distractors_in(&t.distractors.join(", ")),
                t.distractors.len(),
                "{kind}"
            );
            if kind == TaskKind::Passkey {
                assert!(unasked.is_empty() && t.distractors.is_empty());
            } else {
                assert!(!unasked.is_empty(), "{kind}");
            }
        }
    }

    #[test]
    fn multikey_asks_for_one_of_many_labels() {
        let t = generate(&spec(TaskKind::MultiKey, 1500, 0.5, 2), &Haystack::Builtin, &mut words);
        assert_eq!(t.needles.len(), TaskSizes::default().keys);
        assert_eq!(t.answers.len(), 1);
        let asked = t.needles.iter().filter(|n| contains_word(n, &t.answers[0])).count();
        assert_eq!(asked, 1);
    }

    #[test]
    fn vartrack_chain_is_in_order() {
        let t = generate(&spec(TaskKind::VarTrack, 1500, 0.5, 4), &Haystack::Builtin, &mut words);
        assert_eq!(t.answers.len(), TaskSizes::default().chain);
        let mut last = 0;
        for (i, name) in t.answers.iter().enumerate() {
            let at = t.user_message.find(&format!("VAR {name} = ")).unwrap();
            assert!(i == 0 || at > last, "chain out of order");
            last = at;
        }
        // The first of the chain holds the asked value.
        let first = t
            .needles
            .iter()
            .find(|n| n.starts_with(&format!("VAR {} = ", t.answers[0])))
            .unwrap();
        assert!(t.question.contains(
            first
                .trim_start_matches(&format!("VAR {} = ", t.answers[0]))
                .trim_end_matches('.')
        ));
    }

    #[test]
    fn only_vartrack_with_the_question_last_opens_the_answer() {
        for kind in TaskKind::ALL {
            for layout in PromptLayout::ALL {
                let t = generate(
                    &TaskSpec {
                        layout,
                        ..spec(kind, 1200, 0.5, 6)
                    },
                    &Haystack::Builtin,
                    &mut words,
                );
                if kind == TaskKind::VarTrack && layout == PromptLayout::QuestionLast {
                    let value = t.asked.split("the value ").nth(1).unwrap().split(',').next().unwrap();
                    assert!(
                        t.answer_prefix.contains(&format!("assigned the value {value}.")),
                        "{}",
                        t.answer_prefix
                    );
                    assert!(t.answer_prefix.contains(&format!("{} variables", t.answers.len())));
                    assert!(t.answer_prefix.ends_with("They are: VAR"));
                    // It gives away no name.
                    assert!(t.answers.iter().all(|a| !t.answer_prefix.contains(a.as_str())));
                } else {
                    assert_eq!(t.answer_prefix, "", "{kind} {layout}");
                }
            }
        }
    }

    #[test]
    fn scoring_beyond_a_beginning_ignores_what_it_holds() {
        let t = generate(
            &spec(TaskKind::MultiValue, 1500, 0.5, 2),
            &Haystack::Builtin,
            &mut words,
        );
        let [a, b, c, d] = [0, 1, 2, 3].map(|i| t.answers[i].as_str());
        let out = format!("{a}, {b}, {c}");
        assert_eq!(t.score(&out), 0.75);
        // The beginning held `a`: two of the other three were found.
        assert_eq!(t.score_beyond(&format!("{a},"), &out), Some(2.0 / 3.0));
        // A value cut short by the beginning's end is not held by it.
        assert_eq!(t.score_beyond(&a[..4], &out), Some(0.75));
        assert_eq!(t.score_beyond("", &out), Some(0.75));
        assert_eq!(t.score_beyond(&format!("{a} {b} {c} {d}"), &out), None);
    }

    #[test]
    fn whole_word_matching() {
        assert!(contains_word("The number is 1234567.", "1234567"));
        assert!(!contains_word("The number is 12345678.", "1234567"));
        assert!(!contains_word("ABCDEF", "ABCDE"));
        assert!(contains_word("ABCDE, FGHIJ", "FGHIJ"));
        assert!(contains_word("x 99 y 991 99", "99"));
        assert!(!contains_word("", "1"));
    }

    #[test]
    fn text_haystacks_split_and_refuse_short_texts() {
        assert_eq!(
            split_sentences("One. Two!  Three?\nstill three\n\nFour"),
            vec!["One.", "Two!", "Three?", "still three", "Four"]
        );
        assert!(Haystack::from_text("x", "Too short. Really.").is_err());
        let t = generate(&spec(TaskKind::Passkey, 500, 0.5, 1), &text_haystack(), &mut words);
        assert!(t.user_message.contains("rivers and hills"));
    }

    #[test]
    fn builtin_filler_has_no_digits() {
        let t = generate(&spec(TaskKind::Passkey, 2000, 0.5, 9), &Haystack::Builtin, &mut words);
        let without_needle = t.user_message.replace(&t.needles[0], "");
        let doc = &without_needle[..without_needle.find("Question:").unwrap()];
        assert!(!doc.chars().any(|c| c.is_ascii_digit()));
    }
}
