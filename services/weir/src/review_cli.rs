//! `weir review`: the human review queue from a terminal.
//!
//! ```text
//! weir review list [--queue Q] [--state pending]      # most urgent first
//! weir review show ID                                  # the item, its output and its audit trail
//! weir review approve ID [--comment TEXT]              # claim that item, then approve it
//! weir review reject ID [--reason TEXT]                # claim that item, then reject it
//! ```
//!
//! The review service's address is `--review` (`WEIR_REVIEW_URL`, default
//! `http://127.0.0.1:50055`); the key is `--api-key` (`WEIR_API_KEY`), which needs the `reviewer`
//! role for approve and reject when keys are configured. The reviewer's name on the lease and in
//! the audit trail is `--reviewer` (`WEIR_REVIEWER`, default `$USER`).

use std::{io::Write, time::SystemTime};

use clap::{Subcommand, ValueEnum};
use tonic::{Request, transport::Channel};
use weir_proto::review::{
    AuditAction, ClaimNextRequest, GetItemRequest, ItemState, ListAuditEventsRequest,
    ListItemsRequest, ReviewItem, SubmitDecisionRequest, Verdict,
    review_service_client::ReviewServiceClient,
};

use crate::call::failed;

/// Where and who.
#[derive(Debug, Clone, clap::Args)]
pub struct ReviewOptions {
    /// Review service address.
    #[arg(
        long,
        global = true,
        env = "WEIR_REVIEW_URL",
        default_value = "http://127.0.0.1:50055"
    )]
    pub review: String,
    /// API key, sent as `authorization: Bearer <key>`.
    #[arg(long, global = true, env = "WEIR_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Your name, on the lease and in the audit trail (default: $USER).
    #[arg(long, global = true, env = "WEIR_REVIEWER")]
    pub reviewer: Option<String>,
}

/// A `weir review` subcommand.
#[derive(Debug, Clone, Subcommand)]
pub enum ReviewCommand {
    /// List a queue's items, most urgent first.
    List {
        /// Queue name.
        #[arg(long, short, default_value = "default")]
        queue: String,
        /// Only items in this state.
        #[arg(long, short, value_enum, default_value_t = StateFilter::All)]
        state: StateFilter,
        /// Most items to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show an item: its state, output, decision and audit trail.
    Show {
        /// Item id.
        id: String,
    },
    /// Claim an item and approve it.
    Approve {
        /// Item id.
        id: String,
        /// Comment for the audit trail.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Claim an item and reject it.
    Reject {
        /// Item id.
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `--state` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateFilter {
    /// Every state.
    All,
    /// Waiting for a reviewer.
    Pending,
    /// Leased to a reviewer.
    Claimed,
    /// Decided.
    Decided,
    /// Withdrawn.
    Cancelled,
    /// Not decided within its SLA.
    Expired,
}

impl StateFilter {
    fn state(self) -> ItemState {
        match self {
            StateFilter::All => ItemState::Unspecified,
            StateFilter::Pending => ItemState::Pending,
            StateFilter::Claimed => ItemState::Claimed,
            StateFilter::Decided => ItemState::Decided,
            StateFilter::Cancelled => ItemState::Cancelled,
            StateFilter::Expired => ItemState::Expired,
        }
    }
}

/// Runs one subcommand, writing its output to `out`.
pub async fn run(
    options: ReviewOptions,
    command: ReviewCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let channel = Channel::from_shared(options.review.clone())
        .map_err(|e| anyhow::anyhow!("invalid review URL {:?}: {e}", options.review))?
        .connect()
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot reach the review service at {}: {e}", options.review)
        })?;
    let mut client = Client {
        inner: ReviewServiceClient::new(channel),
        key: options.api_key.clone(),
    };
    match command {
        ReviewCommand::List {
            queue,
            state,
            limit,
        } => list(&mut client, &queue, state, limit, out).await,
        ReviewCommand::Show { id } => show(&mut client, &id, out).await,
        ReviewCommand::Approve { id, comment } => {
            let reviewer = reviewer(&options);
            let verdict = Verdict::Approve;
            decide(&mut client, &id, &reviewer, verdict, comment, out).await
        }
        ReviewCommand::Reject { id, reason } => {
            let reviewer = reviewer(&options);
            decide(&mut client, &id, &reviewer, Verdict::Reject, reason, out).await
        }
    }
}

fn reviewer(options: &ReviewOptions) -> String {
    options
        .reviewer
        .clone()
        .filter(|r| !r.is_empty())
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "cli".to_string())
}

struct Client {
    inner: ReviewServiceClient<Channel>,
    key: Option<String>,
}

impl Client {
    fn request<T>(&self, body: T) -> anyhow::Result<Request<T>> {
        crate::call::request(self.key.as_deref(), body)
    }
}

async fn list(
    client: &mut Client,
    queue: &str,
    state: StateFilter,
    limit: usize,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut items = Vec::new();
    let mut token = String::new();
    while items.len() < limit {
        let body = ListItemsRequest {
            queue: queue.to_string(),
            state: state.state() as i32,
            page_size: i32::try_from(limit.min(500)).unwrap_or(500),
            page_token: token,
        };
        let page = client
            .inner
            .list_items(client.request(body)?)
            .await
            .map_err(|s| failed(&s))?
            .into_inner();
        items.extend(page.items);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    items.truncate(limit);
    if items.is_empty() {
        writeln!(out, "no items in queue {queue}")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<36} {:<9} {:>4} {:>8} {:>9}  {:<14} REASONS",
        "ID", "STATE", "PRIO", "AGE", "SLA IN", "MODEL"
    )?;
    let now = now_secs();
    for item in &items {
        let created = item.create_time.map_or(now, |t| t.seconds);
        let deadline = item.sla_deadline_time.map_or(now, |t| t.seconds);
        writeln!(
            out,
            "{:<36} {:<9} {:>4} {:>8} {:>9}  {:<14} {}",
            item.id,
            state_name(item.state),
            item.priority,
            human(now - created),
            if deadline >= now {
                human(deadline - now)
            } else {
                format!("-{}", human(now - deadline))
            },
            item.model,
            item.reasons.join(","),
        )?;
    }
    Ok(())
}

async fn get(client: &mut Client, id: &str) -> anyhow::Result<ReviewItem> {
    let body = GetItemRequest {
        item_id: id.to_string(),
    };
    client
        .inner
        .get_item(client.request(body)?)
        .await
        .map_err(|s| failed(&s))?
        .into_inner()
        .item
        .ok_or_else(|| anyhow::anyhow!("the review service returned no item"))
}

async fn show(client: &mut Client, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let item = get(client, id).await?;
    writeln!(out, "id:        {}", item.id)?;
    writeln!(out, "queue:     {}", item.queue)?;
    writeln!(out, "state:     {}", state_name(item.state))?;
    writeln!(out, "priority:  {}", item.priority)?;
    writeln!(out, "model:     {}", item.model)?;
    writeln!(out, "reasons:   {}", item.reasons.join(", "))?;
    if let Some(lease) = &item.lease {
        writeln!(
            out,
            "lease:     {} (held by {})",
            lease.lease_id, lease.reviewer
        )?;
    }
    if let Some(decision) = &item.decision {
        let verdict = Verdict::try_from(decision.verdict).map_or("?", |v| v.as_str_name());
        writeln!(out, "decision:  {verdict} by {}", decision.reviewer)?;
        if !decision.comment.is_empty() {
            writeln!(out, "comment:   {}", decision.comment)?;
        }
        if !decision.edited_content.is_empty() {
            writeln!(out, "edited:    {}", decision.edited_content)?;
        }
    }
    for message in &item.conversation {
        writeln!(out, "> {}", message.content)?;
    }
    if let Some(output) = &item.output {
        writeln!(out, "output:\n{}", output.content)?;
    }
    let body = ListAuditEventsRequest {
        item_id: id.to_string(),
        page_size: 1000,
        page_token: String::new(),
    };
    let events = client
        .inner
        .list_audit_events(client.request(body)?)
        .await
        .map_err(|s| failed(&s))?
        .into_inner()
        .events;
    writeln!(out, "audit:")?;
    for event in events {
        let action = AuditAction::try_from(event.action)
            .map_or("?", |a| a.as_str_name())
            .trim_start_matches("AUDIT_ACTION_");
        let time = event.time.map_or(0, |t| t.seconds);
        writeln!(
            out,
            "  {time} {action:<14} {:<28} {}",
            event.actor, event.detail_json
        )?;
    }
    Ok(())
}

async fn decide(
    client: &mut Client,
    id: &str,
    reviewer: &str,
    verdict: Verdict,
    comment: Option<String>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    // ClaimNext takes the most urgent item; naming the item claims exactly this one.
    let item = get(client, id).await?;
    let claim = ClaimNextRequest {
        queue: item.queue.clone(),
        reviewer: reviewer.to_string(),
        lease_duration: None,
        item_id: id.to_string(),
    };
    let claimed = client
        .inner
        .claim_next(client.request(claim)?)
        .await
        .map_err(|s| failed(&s))?
        .into_inner()
        .item
        .ok_or_else(|| anyhow::anyhow!("item {id} could not be claimed"))?;
    let lease_id = claimed.lease.map(|l| l.lease_id).unwrap_or_default();
    let body = SubmitDecisionRequest {
        item_id: id.to_string(),
        lease_id,
        verdict: verdict as i32,
        edited_content: String::new(),
        comment: comment.unwrap_or_default(),
    };
    let decided = client
        .inner
        .submit_decision(client.request(body)?)
        .await
        .map_err(|s| failed(&s))?
        .into_inner()
        .item
        .ok_or_else(|| anyhow::anyhow!("the review service returned no item"))?;
    let word = if verdict == Verdict::Approve {
        "approved"
    } else {
        "rejected"
    };
    writeln!(out, "{word} {} ({})", decided.id, state_name(decided.state))?;
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    match ItemState::try_from(state) {
        Ok(ItemState::Pending) => "pending",
        Ok(ItemState::Claimed) => "claimed",
        Ok(ItemState::Decided) => "decided",
        Ok(ItemState::Cancelled) => "cancelled",
        Ok(ItemState::Expired) => "expired",
        _ => "unknown",
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `42s`, `5m`, `3h`, `2d`.
fn human(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
