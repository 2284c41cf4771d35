//! The simulated model (`backend = "sim"`, the default): a deterministic stand-in for an LLM, so
//! Weir runs, demos and is tested with no API key and no network.
//!
//! # The answer
//!
//! The same request always gets the same answer. The answer is derived from a fingerprint of the
//! request (FNV-1a, 64 bits, over the model name, every message's role, content, name, tool call
//! id and tool calls, and the temperature, top_p and seed parameters) that seeds a SplitMix64
//! generator picking words from a fixed vocabulary. Both are written out here rather than taken
//! from `std`, whose hasher may change between Rust releases. When the conversation has a user
//! message, the answer starts by quoting its first words (`You said "what is the…".`), so a human
//! sees that it answered *their* message.
//!
//! `max_tokens` and `stop` are not part of the fingerprint: they cut the same answer short, as
//! they would a real model's. One token is one word or one punctuation mark, exactly what
//! [`weir_mesh::tokens::count_text`] counts for the `sim` family, so the reported usage always
//! agrees with the router's and the budget's own counts.
//!
//! # Behaviour (`[models.<name>.sim]`, see `SimSpec`)
//!
//! In order, for each request:
//! 1. the request is recorded in the in-memory [`SimLog`] (the last [`SIM_LOG_CAPACITY`]
//!    requests), which tests read through `InferenceApi::sim_requests`;
//! 2. `added_latency` passes;
//! 3. an injected fault fails the request when its turn has come: requests are numbered per model
//!    from 0 and request *n* fails iff ⌊(n+1)·error_rate⌋ > ⌊n·error_rate⌋, so exactly that
//!    fraction of requests fails, evenly spread (0.25 fails requests 3, 7, 11, …). The failure has
//!    the status named by `error_code`, reason `SIMULATED_FAULT`, and RetryInfo from `retry_after`
//!    for RESOURCE_EXHAUSTED and UNAVAILABLE;
//! 4. with `hang`, nothing more happens: the call ends when the caller's deadline passes or it
//!    cancels;
//! 5. tokens are produced: the first after `time_to_first_token`, then `tokens_per_second` (0 means
//!    all at once). Each token's due time is computed from the start, so pacing does not drift;
//! 6. with `cut_after_tokens = N`, the answer breaks off after N tokens with UNAVAILABLE, reason
//!    `STREAM_CUT`, as a dropped connection would (a unary call fails the same way);
//! 7. the answer is `output_tokens` long, cut at the first stop sequence (FINISH_REASON_STOP) or
//!    at `max_tokens` or the end of the context window (FINISH_REASON_LENGTH).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use tokio::time::Instant;
use tonic::Code;
use weir_mesh::{
    ApiError,
    catalog::{ModelSpec, SimSpec},
    error::{code_name, parse_code},
    tokens,
};
use weir_proto::common::{FinishReason, GenerationParams, Message, Role};

use super::{Call, Event, EventStream, Finish, Generation, collect, instant_after, usage};

/// How many requests the [`SimLog`] keeps (the oldest are forgotten first).
pub const SIM_LOG_CAPACITY: usize = 256;
/// How many tokens of the last user message the answer quotes.
pub const ECHO_TOKENS: usize = 8;
/// Reason of injected faults.
pub const FAULT_REASON: &str = "SIMULATED_FAULT";
/// Reason of a stream cut by `cut_after_tokens`.
pub const CUT_REASON: &str = "STREAM_CUT";

/// A request as a simulated model received it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimRequest {
    /// The catalog name of the model.
    pub model: String,
    /// The conversation the model was given.
    pub messages: Vec<Message>,
    /// The generation parameters (defaults when the request left them unset).
    pub params: GenerationParams,
    /// The caller's request id (empty when it set none).
    pub request_id: String,
    /// True for `GenerateStream`, false for `Generate`.
    pub streamed: bool,
    /// The time the caller's deadline left when the call arrived (`None`: no deadline), so tests
    /// can see how much of a deadline reached this hop.
    pub deadline_remaining: Option<std::time::Duration>,
}

/// The last [`SIM_LOG_CAPACITY`] requests received by the simulated models of one service,
/// shared by all of them.
#[derive(Debug, Clone, Default)]
pub struct SimLog(Arc<Mutex<VecDeque<SimRequest>>>);

impl SimLog {
    /// Records a request, forgetting the oldest beyond the capacity.
    pub fn record(&self, request: SimRequest) {
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == SIM_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(request);
    }

    /// The recorded requests, oldest first.
    pub fn snapshot(&self) -> Vec<SimRequest> {
        let log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.iter().cloned().collect()
    }
}

/// One simulated model.
#[derive(Debug)]
pub struct SimModel {
    name: String,
    spec: SimSpec,
    answer_tokens: u32,
    requests: AtomicU64,
    log: SimLog,
}

impl SimModel {
    /// The simulated model `name`, recording its requests in `log`.
    pub fn new(name: &str, spec: &ModelSpec, log: SimLog) -> Self {
        Self {
            name: name.to_string(),
            spec: spec.sim.clone(),
            answer_tokens: spec.sim.output_tokens,
            requests: AtomicU64::new(0),
            log,
        }
    }

    /// Generates the whole answer: the streamed answer, collected.
    pub async fn generate(&self, call: Call) -> Result<Generation, ApiError> {
        collect(self.stream(call, false).await?).await
    }

    /// Starts a streamed answer (steps 1 to 4 of the module doc happen here, the rest in the
    /// stream).
    pub async fn stream(&self, call: Call, streamed: bool) -> Result<EventStream, ApiError> {
        self.log.record(SimRequest {
            model: self.name.clone(),
            messages: call.input.messages.clone(),
            params: call.input.params.clone(),
            request_id: call.input.request_id.clone(),
            streamed,
            deadline_remaining: call
                .deadline
                .map(|deadline| deadline.saturating_duration_since(call.received)),
        });
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        if !self.spec.added_latency.is_zero() {
            tokio::time::sleep_until(instant_after(Instant::now(), self.spec.added_latency)).await;
        }
        if should_fail(n, self.spec.error_rate) {
            return Err(self.fault(n));
        }
        if self.spec.hang {
            std::future::pending::<()>().await;
        }
        let answer = answer(
            &self.name,
            &call.input.messages,
            &call.input.params,
            self.answer_tokens as usize,
        );
        let (tokens, finish_reason) =
            cut(answer, &call.input.params.stop, call.checked.output_limit);
        let pacing = Pacing {
            start: Instant::now(),
            time_to_first_token: self.spec.time_to_first_token,
            tokens_per_second: self.spec.tokens_per_second,
        };
        let state = Generator {
            model: self.name.clone(),
            tokens,
            next: 0,
            pacing,
            cut_after: self.spec.cut_after_tokens,
            finish_reason,
            prompt_tokens: call.checked.prompt_tokens,
            received: call.received,
            first_token_at: None,
            ended: false,
        };
        Ok(futures::stream::unfold(state, Generator::step).boxed())
    }

    fn fault(&self, n: u64) -> ApiError {
        // `OK` is no failure: it falls back to the default status.
        let code = parse_code(&self.spec.error_code)
            .filter(|code| *code != Code::Ok)
            .unwrap_or(Code::Unavailable);
        let message = format!(
            "simulated {} from model {} (request {n}, error_rate {})",
            code_name(code),
            self.name,
            self.spec.error_rate
        );
        let mut error = ApiError::new(code, FAULT_REASON, message.clone())
            .with_metadata("model", self.name.clone());
        if code == Code::ResourceExhausted {
            error = error.with_quota_violation(format!("upstream:{}", self.name), message);
        }
        if let Some(delay) = self.spec.retry_after
            && matches!(code, Code::ResourceExhausted | Code::Unavailable)
        {
            error = error.with_retry_after(delay);
        }
        error
    }
}

/// Whether request `n` (0-based) of a model with this error rate fails: exactly ⌊N·rate⌋ of the
/// first N requests do, evenly spread.
pub fn should_fail(n: u64, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    // u64 → f64 is exact up to 2^53 requests, far beyond any process lifetime.
    #[allow(clippy::cast_precision_loss)]
    let (this, next) = (n as f64 * rate, (n + 1) as f64 * rate);
    next.floor() > this.floor()
}

/// Sleeps until `due`, or not at all when it has come: a timer of zero length still waits for the
/// runtime's next timer tick (about a millisecond), so an instant model would answer in
/// milliseconds and every benchmark over it would measure the timer instead of the mesh.
async fn wait_until(due: Instant) {
    if due > Instant::now() {
        tokio::time::sleep_until(due).await;
    }
}

/// When each token is due.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    start: Instant,
    time_to_first_token: Duration,
    tokens_per_second: f64,
}

impl Pacing {
    /// Token `i` is due `time_to_first_token + i / tokens_per_second` after the start.
    fn due(&self, i: usize) -> Instant {
        let mut offset = self.time_to_first_token;
        if self.tokens_per_second > 0.0 {
            #[allow(clippy::cast_precision_loss)]
            let seconds = i as f64 / self.tokens_per_second;
            offset = offset
                .saturating_add(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX));
        }
        instant_after(self.start, offset)
    }
}

/// The state of a streamed simulated answer.
struct Generator {
    model: String,
    tokens: Vec<String>,
    next: usize,
    pacing: Pacing,
    cut_after: Option<u32>,
    finish_reason: FinishReason,
    prompt_tokens: u32,
    received: Instant,
    first_token_at: Option<Instant>,
    ended: bool,
}

impl Generator {
    async fn step(mut self) -> Option<(Result<Event, ApiError>, Self)> {
        if self.ended {
            return None;
        }
        if self.next < self.tokens.len() {
            if self.cut_after.is_some_and(|n| n as usize == self.next) {
                self.ended = true;
                let error = ApiError::unavailable(
                    CUT_REASON,
                    format!(
                        "model {} broke off its answer after {} tokens (simulated cut)",
                        self.model, self.next
                    ),
                )
                .with_metadata("model", self.model.clone());
                return Some((Err(error), self));
            }
            wait_until(self.pacing.due(self.next)).await;
            self.first_token_at.get_or_insert_with(Instant::now);
            let index = self.next as u64;
            let text = std::mem::take(&mut self.tokens[self.next]);
            self.next += 1;
            return Some((Ok(Event::Delta { text, index }), self));
        }
        self.ended = true;
        if self.tokens.is_empty() {
            // An empty answer (a stop sequence at the very start) still takes the time to decide.
            wait_until(self.pacing.due(0)).await;
        }
        let first = self.first_token_at.unwrap_or_else(Instant::now);
        let finish = Finish {
            finish_reason: self.finish_reason,
            usage: usage(u64::from(self.prompt_tokens), self.tokens.len() as u64, 0),
            time_to_first_token: first.saturating_duration_since(self.received),
        };
        Some((Ok(Event::Done(finish)), self))
    }
}

/// The full answer (before `max_tokens` and stop sequences) of `length` tokens, each a word with
/// its leading space or a punctuation mark; concatenated, they count as exactly `length` `sim`
/// tokens.
pub fn answer(
    model: &str,
    messages: &[Message],
    params: &GenerationParams,
    length: usize,
) -> Vec<String> {
    let mut rng = SplitMix64(fingerprint(model, messages, params));
    let mut out: Vec<String> = Vec::with_capacity(length + 16);

    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.role == i32::from(Role::User));
    if let Some(message) = last_user {
        let text = message.content.as_str();
        let quoted: Vec<(usize, &str)> = tokens::sim_tokens(text).take(ECHO_TOKENS + 1).collect();
        if !quoted.is_empty() {
            out.extend(["You", " said", " \""].map(String::from));
            for (j, (offset, token)) in quoted.iter().take(ECHO_TOKENS).enumerate() {
                let spaced = j > 0 && text[..*offset].ends_with(char::is_whitespace);
                out.push(if spaced {
                    format!(" {token}")
                } else {
                    (*token).to_string()
                });
            }
            if quoted.len() > ECHO_TOKENS {
                out.push("…".to_string());
            }
            out.extend(["\"", "."].map(String::from));
        }
    }

    while out.len() < length {
        let remaining = length - out.len();
        let words = if remaining == 1 {
            1
        } else {
            (4 + rng.below(8) as usize).min(remaining - 1)
        };
        for w in 0..words {
            let word = VOCABULARY[rng.below(VOCABULARY.len() as u64) as usize];
            out.push(if w == 0 {
                format!(" {}", capitalize(word))
            } else {
                format!(" {word}")
            });
        }
        if remaining > 1 {
            out.push(".".to_string());
        }
    }
    out.truncate(length);
    if let Some(first) = out.first_mut() {
        *first = first.trim_start().to_string();
    }
    out
}

/// Cuts an answer at the first stop sequence (FINISH_REASON_STOP, the stop text and the token it
/// starts in excluded) or at `limit` tokens (FINISH_REASON_LENGTH), whichever comes first.
pub fn cut(mut tokens: Vec<String>, stop: &[String], limit: u32) -> (Vec<String>, FinishReason) {
    let limit = limit as usize;
    let stop_at = first_stop(&tokens, stop);
    let (keep, reason) = match stop_at {
        Some(k) if k < limit => (k, FinishReason::Stop),
        _ if tokens.len() > limit => (limit, FinishReason::Length),
        _ => (tokens.len(), FinishReason::Stop),
    };
    tokens.truncate(keep);
    (tokens, reason)
}

/// The number of whole tokens before the earliest occurrence of any stop sequence.
fn first_stop(tokens: &[String], stop: &[String]) -> Option<usize> {
    if stop.is_empty() {
        return None;
    }
    let text: String = tokens.concat();
    let at = stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()?;
    let mut end = 0;
    Some(
        tokens
            .iter()
            .take_while(|token| {
                end += token.len();
                end <= at
            })
            .count(),
    )
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

/// Words of simulated answers.
const VOCABULARY: [&str; 64] = [
    "the", "mesh", "routes", "every", "request", "to", "a", "model", "that", "answers", "with",
    "tokens", "streamed", "over", "gRPC", "while", "budgets", "track", "spend", "and", "retries",
    "wait", "for", "pushback", "quiet", "river", "carries", "light", "across", "stone", "bridges",
    "under", "an", "amber", "sky", "so", "each", "signal", "finds", "its", "way", "home", "before",
    "deadline", "passes", "gently", "clear", "patient", "careful", "bright", "simple", "steady",
    "window", "context", "grows", "then", "settles", "into", "calm", "useful", "reply", "today",
    "still", "here",
];

/// FNV-1a, 64 bits: a tiny hash whose output is fixed by its definition, not by a Rust release.
#[derive(Debug, Clone, Copy)]
struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self(Self::OFFSET)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// A length-prefixed string, so ("ab", "c") and ("a", "bc") hash differently.
    fn str(&mut self, text: &str) {
        self.bytes(&(text.len() as u64).to_le_bytes());
        self.bytes(text.as_bytes());
    }

    fn option(&mut self, value: Option<u64>) {
        match value {
            None => self.bytes(&[0]),
            Some(value) => {
                self.bytes(&[1]);
                self.bytes(&value.to_le_bytes());
            }
        }
    }
}

/// The fingerprint of a request that seeds its answer (see the module doc for what it covers).
fn fingerprint(model: &str, messages: &[Message], params: &GenerationParams) -> u64 {
    let mut hash = Fnv1a::new();
    hash.str(model);
    hash.bytes(&(messages.len() as u64).to_le_bytes());
    for message in messages {
        hash.bytes(&message.role.to_le_bytes());
        hash.str(&message.content);
        hash.str(&message.name);
        hash.str(&message.tool_call_id);
        hash.bytes(&(message.tool_calls.len() as u64).to_le_bytes());
        for call in &message.tool_calls {
            hash.str(&call.id);
            hash.str(&call.name);
            hash.str(&call.arguments_json);
        }
    }
    hash.option(params.temperature.map(|t| u64::from(t.to_bits())));
    hash.option(params.top_p.map(|p| u64::from(p.to_bits())));
    hash.option(params.seed.map(i64::cast_unsigned));
    hash.0
}

/// SplitMix64 (Steele, Lea and Flood): a small, well-mixed generator for picking words.
#[derive(Debug, Clone, Copy)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (the modulo bias is irrelevant for picking words).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use futures::FutureExt;
    use weir_proto::common::ToolCall;

    use super::*;
    use crate::validate::{Checked, Input};

    fn user(text: &str) -> Message {
        Message {
            role: Role::User.into(),
            content: text.to_string(),
            ..Message::default()
        }
    }

    fn spec(sim: SimSpec) -> ModelSpec {
        ModelSpec {
            sim,
            ..ModelSpec::default()
        }
    }

    fn call(text: &str, params: GenerationParams, output_limit: u32) -> Call {
        let messages = vec![user(text)];
        Call {
            checked: Checked {
                prompt_tokens: tokens::count_messages("sim", &messages),
                output_limit,
            },
            input: Input {
                model: "sim-test".to_string(),
                messages,
                params,
                ..Input::default()
            },
            received: Instant::now(),
            deadline: None,
        }
    }

    fn model(sim: SimSpec) -> SimModel {
        SimModel::new("sim-test", &spec(sim), SimLog::default())
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        let hash = |text: &str| {
            let mut h = Fnv1a::new();
            h.bytes(text.as_bytes());
            h.0
        };
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn answers_are_deterministic_and_depend_on_the_request() {
        let params = GenerationParams::default();
        let a = answer("m", &[user("Hello there")], &params, 40);
        assert_eq!(a, answer("m", &[user("Hello there")], &params, 40));
        assert_ne!(a, answer("m", &[user("Hello there!")], &params, 40));
        assert_ne!(a, answer("other", &[user("Hello there")], &params, 40));
        let seeded = GenerationParams {
            seed: Some(7),
            ..GenerationParams::default()
        };
        assert_ne!(a, answer("m", &[user("Hello there")], &seeded, 40));
        assert_eq!(a[..7].concat(), "You said \"Hello there\".");
        // Golden value: the answer must not change between builds or Rust releases.
        assert_eq!(
            a[7..].concat(),
            " Over answers finds here bridges and over the context retries. Patient passes the \
             wait sky pushback useful over spend bridges here. Over grows river before that. \
             Over so and."
        );
    }

    #[test]
    fn answers_quote_the_last_user_message() {
        let params = GenerationParams::default();
        let messages = [
            user("first question"),
            Message {
                role: Role::Assistant.into(),
                content: "an answer".to_string(),
                ..Message::default()
            },
            user("What's the capital of France, and why is it Paris?"),
        ];
        let text = answer("m", &messages, &params, 30).concat();
        assert!(
            text.starts_with("You said \"What's the capital of France,…\"."),
            "{text}"
        );
        let system_only = [Message {
            role: Role::System.into(),
            content: "be brief".to_string(),
            ..Message::default()
        }];
        assert!(
            !answer("m", &system_only, &params, 10)
                .concat()
                .contains("said")
        );
    }

    #[test]
    fn answers_have_exactly_the_requested_number_of_tokens() {
        let params = GenerationParams::default();
        let prompts = [
            "Hello",
            "  leading space and don't stop",
            "emoji 🙂🙂 and “quotes” — dashes… C++ snake_case",
            "e\u{301}tude: combining marks",
            "",
            "!!!",
        ];
        for prompt in prompts {
            for length in [0, 1, 2, 3, 5, 8, 13, 24, 100] {
                let tokens = answer("sim-small", &[user(prompt)], &params, length);
                assert_eq!(tokens.len(), length, "{prompt:?}");
                let text = tokens.concat();
                assert_eq!(
                    tokens::count_text("sim", &text) as usize,
                    length,
                    "{prompt:?} / {length}: {text:?}"
                );
                for token in &tokens {
                    assert_eq!(tokens::count_text("sim", token), 1, "{token:?}");
                }
            }
        }
    }

    #[test]
    fn long_answers_are_sentences() {
        let text = answer("m", &[user("hi")], &GenerationParams::default(), 60).concat();
        assert!(text.ends_with('.'), "{text}");
        assert!(!text.contains("  ") && !text.contains(" ."), "{text}");
    }

    #[test]
    fn fingerprint_covers_tool_calls_and_sampling() {
        let base = [user("x")];
        let mut with_call = base.clone();
        with_call[0].tool_calls.push(ToolCall {
            id: "1".to_string(),
            name: "f".to_string(),
            arguments_json: "{}".to_string(),
        });
        let params = GenerationParams::default();
        assert_ne!(
            fingerprint("m", &base, &params),
            fingerprint("m", &with_call, &params)
        );
        let hot = GenerationParams {
            temperature: Some(1.0),
            ..GenerationParams::default()
        };
        assert_ne!(
            fingerprint("m", &base, &params),
            fingerprint("m", &base, &hot)
        );
        let capped = GenerationParams {
            max_tokens: Some(3),
            stop: vec!["x".to_string()],
            ..GenerationParams::default()
        };
        assert_eq!(
            fingerprint("m", &base, &params),
            fingerprint("m", &base, &capped)
        );
    }

    #[test]
    fn error_rate_fails_exactly_that_fraction_evenly() {
        for (rate, n, expected) in [
            (0.0, 1000, 0),
            (1.0, 1000, 1000),
            (0.25, 1000, 250),
            (0.1, 1000, 100),
            (0.3, 10, 3),
            (0.5, 7, 3),
            (0.333, 1000, 333),
        ] {
            let failed = (0..n).filter(|&i| should_fail(i, rate)).count();
            assert_eq!(failed, expected, "rate {rate} over {n}");
        }
        let fourths: Vec<u64> = (0..12).filter(|&i| should_fail(i, 0.25)).collect();
        assert_eq!(fourths, [3, 7, 11]);
    }

    fn words(tokens: &[&str]) -> Vec<String> {
        tokens.iter().map(|t| (*t).to_string()).collect()
    }

    #[test]
    fn cut_at_stop_sequences_or_length() {
        let tokens = words(&["One", " two", " three", ".", " Four", " five"]);
        assert_eq!(
            cut(tokens.clone(), &[], 10),
            (tokens.clone(), FinishReason::Stop)
        );
        assert_eq!(
            cut(tokens.clone(), &[], 6),
            (tokens.clone(), FinishReason::Stop)
        );
        assert_eq!(
            cut(tokens.clone(), &[], 2),
            (words(&["One", " two"]), FinishReason::Length)
        );
        // The stop sequence and the token it starts in are left out.
        assert_eq!(
            cut(tokens.clone(), &["hree".to_string()], 10),
            (words(&["One", " two"]), FinishReason::Stop)
        );
        assert_eq!(
            cut(
                tokens.clone(),
                &["zzz".to_string(), ". Four".to_string()],
                10
            ),
            (words(&["One", " two", " three"]), FinishReason::Stop)
        );
        // The earliest of several stop sequences wins.
        assert_eq!(
            cut(tokens.clone(), &["five".to_string(), "two".to_string()], 10),
            (words(&["One"]), FinishReason::Stop)
        );
        // A stop sequence beyond max_tokens is never reached.
        assert_eq!(
            cut(tokens.clone(), &["five".to_string()], 3),
            (words(&["One", " two", " three"]), FinishReason::Length)
        );
        assert_eq!(
            cut(tokens, &["One".to_string()], 3),
            (Vec::new(), FinishReason::Stop)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_paced_from_the_start_without_drift() {
        let model = model(SimSpec {
            time_to_first_token: Duration::from_millis(100),
            tokens_per_second: 3.0,
            output_tokens: 10,
            ..SimSpec::default()
        });
        let start = Instant::now();
        let mut stream = model
            .stream(call("hi", GenerationParams::default(), 100), true)
            .await
            .unwrap();
        let mut times = Vec::new();
        let mut done = None;
        while let Some(event) = stream.next().await {
            match event.unwrap() {
                Event::Delta { index, .. } => {
                    assert_eq!(index as usize, times.len());
                    times.push(start.elapsed());
                }
                Event::Done(finish) => done = Some(finish),
            }
        }
        assert_eq!(times.len(), 10);
        for (i, at) in times.iter().enumerate() {
            let due = Duration::from_millis(100) + Duration::from_secs_f64(i as f64 / 3.0);
            // Paused time advances exactly to each timer (rounded up to the millisecond).
            assert!(
                *at >= due && *at <= due + Duration::from_millis(1),
                "token {i} at {at:?}, due {due:?}"
            );
        }
        let done = done.unwrap();
        assert_eq!(done.time_to_first_token, Duration::from_millis(100));
        assert_eq!(done.usage.output_tokens, 10);
        assert_eq!(done.finish_reason, FinishReason::Stop);
    }

    #[tokio::test]
    async fn an_instant_model_answers_without_waiting_for_a_timer() {
        // No latency, no pacing: the whole answer is ready on the first poll, streamed or not.
        let model = model(SimSpec {
            output_tokens: 50,
            ..SimSpec::default()
        });
        let generation = model
            .generate(call("hi", GenerationParams::default(), 1000))
            .now_or_never()
            .expect("an instant model never waits")
            .unwrap();
        assert_eq!(generation.finish.usage.output_tokens, 50);
        let stream = model
            .stream(call("hi", GenerationParams::default(), 1000), true)
            .now_or_never()
            .expect("the stream starts at once")
            .unwrap();
        let events: Vec<_> = stream
            .collect::<Vec<_>>()
            .now_or_never()
            .expect("every event is ready at once");
        assert_eq!(events.len(), 51, "50 deltas and done");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_tokens_per_second_is_instant_and_latency_comes_first() {
        let model = model(SimSpec {
            added_latency: Duration::from_millis(50),
            output_tokens: 100,
            ..SimSpec::default()
        });
        let start = Instant::now();
        let generation = model
            .generate(call("hi", GenerationParams::default(), 1000))
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        assert_eq!(generation.finish.usage.output_tokens, 100);
        assert_eq!(
            generation.finish.time_to_first_token,
            Duration::from_millis(50)
        );
        assert_eq!(tokens::count_text("sim", &generation.message.content), 100);
    }

    #[tokio::test]
    async fn usage_counts_prompt_and_answer() {
        let model = model(SimSpec::default());
        let request = call("How are you?", GenerationParams::default(), 1000);
        let prompt = request.checked.prompt_tokens;
        let generation = model.generate(request).await.unwrap();
        let usage = generation.finish.usage;
        assert_eq!(usage.input_tokens, i64::from(prompt));
        assert_eq!(usage.input_tokens, 4 + 4 + 3);
        assert_eq!(usage.output_tokens, 32);
        assert_eq!(usage.total_tokens, usage.input_tokens + 32);
        assert_eq!(generation.message.role, i32::from(Role::Assistant));
    }

    #[tokio::test]
    async fn max_tokens_and_stop_cut_the_same_answer() {
        let model = model(SimSpec::default());
        let full = model
            .generate(call("Tell me", GenerationParams::default(), 1000))
            .await
            .unwrap();
        let short = model
            .generate(call("Tell me", GenerationParams::default(), 5))
            .await
            .unwrap();
        assert_eq!(short.finish.finish_reason, FinishReason::Length);
        assert_eq!(short.finish.usage.output_tokens, 5);
        assert!(full.message.content.starts_with(&short.message.content));
        assert_eq!(short.message.content, "You said \"Tell me");

        let stop = GenerationParams {
            stop: vec!["\".".to_string()],
            ..GenerationParams::default()
        };
        let stopped = model.generate(call("Tell me", stop, 1000)).await.unwrap();
        assert_eq!(stopped.message.content, "You said \"Tell me");
        assert_eq!(stopped.finish.finish_reason, FinishReason::Stop);
        assert_eq!(stopped.finish.usage.output_tokens, 5);
    }

    #[tokio::test]
    async fn injected_faults_fail_exactly_the_configured_requests() {
        let model = model(SimSpec {
            error_rate: 0.5,
            error_code: "resource_exhausted".to_string(),
            retry_after: Some(Duration::from_secs(3)),
            ..SimSpec::default()
        });
        let mut outcomes = Vec::new();
        for _ in 0..6 {
            let result = model
                .generate(call("hi", GenerationParams::default(), 10))
                .await;
            outcomes.push(result.err());
        }
        let failed: Vec<usize> = (0..6).filter(|i| outcomes[*i].is_some()).collect();
        assert_eq!(failed, [1, 3, 5]);
        let error = outcomes[1].clone().unwrap();
        assert_eq!(error.code(), Code::ResourceExhausted);
        assert_eq!(error.reason(), FAULT_REASON);
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(error.quota_violations()[0].0, "upstream:sim-test");
    }

    #[tokio::test]
    async fn cut_after_tokens_breaks_streams_and_unary_calls() {
        let model = model(SimSpec {
            cut_after_tokens: Some(3),
            ..SimSpec::default()
        });
        let mut stream = model
            .stream(call("hi", GenerationParams::default(), 100), true)
            .await
            .unwrap();
        let mut deltas = 0;
        let mut error = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Delta { .. }) => deltas += 1,
                Ok(Event::Done(_)) => panic!("a cut stream must not finish"),
                Err(e) => error = Some(e),
            }
        }
        assert_eq!(deltas, 3);
        let error = error.unwrap();
        assert_eq!(
            (error.code(), error.reason()),
            (Code::Unavailable, CUT_REASON)
        );

        let unary = model
            .generate(call("hi", GenerationParams::default(), 100))
            .await;
        assert_eq!(
            unary.err().map(|e| e.reason().to_string()).as_deref(),
            Some(CUT_REASON)
        );
        // An answer shorter than the cut completes.
        let short = model
            .generate(call("hi", GenerationParams::default(), 2))
            .await;
        assert!(short.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn hang_never_answers() {
        let model = model(SimSpec {
            hang: true,
            ..SimSpec::default()
        });
        let result = tokio::time::timeout(
            Duration::from_secs(3600),
            model.generate(call("hi", GenerationParams::default(), 10)),
        )
        .await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn the_log_keeps_the_last_requests() {
        let log = SimLog::default();
        let model = SimModel::new("sim-test", &spec(SimSpec::default()), log.clone());
        for i in 0..(SIM_LOG_CAPACITY + 4) {
            let _ = model
                .generate(call(
                    &format!("message {i}"),
                    GenerationParams::default(),
                    1,
                ))
                .await;
        }
        let requests = log.snapshot();
        assert_eq!(requests.len(), SIM_LOG_CAPACITY);
        assert_eq!(requests[0].messages[0].content, "message 4");
        assert_eq!(
            requests.last().map(|r| r.messages[0].content.as_str()),
            Some(format!("message {}", SIM_LOG_CAPACITY + 3).as_str())
        );
        assert!(!requests[0].streamed);
    }
}
