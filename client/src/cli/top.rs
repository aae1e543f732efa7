//! `omnibus top`: a full-screen live dashboard fed by consumer-svc's Subscribe stream (a
//! snapshot first, then updates, resumed across dropped connections) and its status.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use omnibus_proto::consumer::v1 as pb;
use omnibus_proto::consumer::v1::consumer_service_client::ConsumerServiceClient;
use parking_lot::Mutex;
use pb::subscribe_response::Update;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table};
use tokio::sync::mpsc;

use super::stream::{self, Item};
use super::{Cli, Fail, Result, Svc, connect, parse_duration};

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Only this agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// Screen refresh interval.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub refresh: Duration,
}

const RECENT: usize = 200;
/// Seconds of throughput history kept (the sparkline shows as many as fit).
const SECONDS: usize = 300;

/// What the dashboard shows (pure: updated by [`Dashboard::apply`], drawn by [`draw`]).
#[derive(Default)]
pub struct Dashboard {
    pub addr: String,
    pub agents: BTreeMap<String, pb::AgentMetrics>,
    pub recent: VecDeque<pb::AgentAction>,
    pub status: Option<pb::ConsumerStatus>,
    pub connected: bool,
    pub notice: String,
    /// Events per wall-clock second, newest last (`SECONDS` of them).
    pub per_second: VecDeque<u64>,
    current_second: u64,
    pub totals: [u64; 4],
    pub sequence: u64,
    /// An error no reconnect can fix (a refused token, streams switched off): the dashboard
    /// closes and `top` fails with it, as `tail` does.
    pub fatal: Option<String>,
}

impl Dashboard {
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            per_second: VecDeque::from(vec![0; SECONDS]),
            ..Default::default()
        }
    }

    /// Moves the throughput window to wall-clock second `now_s`.
    pub fn tick(&mut self, now_s: u64) {
        if self.current_second == 0 {
            self.current_second = now_s;
        }
        while self.current_second < now_s {
            self.per_second.push_back(0);
            if self.per_second.len() > SECONDS {
                self.per_second.pop_front();
            }
            self.current_second += 1;
        }
    }

    fn count_event(&mut self, kind: usize, now_s: u64) {
        self.tick(now_s);
        if let Some(last) = self.per_second.back_mut() {
            *last += 1;
        }
        self.totals[kind] += 1;
    }

    /// Events per second over the last few complete seconds.
    pub fn rate(&self) -> f64 {
        let n = self.per_second.len();
        if n < 2 {
            return 0.0;
        }
        let window: Vec<u64> = self
            .per_second
            .iter()
            .rev()
            .skip(1)
            .take(5)
            .copied()
            .collect();
        window.iter().sum::<u64>() as f64 / window.len() as f64
    }

    pub fn apply(&mut self, msg: pb::SubscribeResponse, now_s: u64) {
        self.sequence = self.sequence.max(msg.sequence);
        match msg.update {
            Some(Update::Snapshot(s)) => {
                self.agents = s.agents.into_iter().map(|a| (a.agent.clone(), a)).collect();
                self.recent = s.actions.into_iter().take(RECENT).collect();
                if s.status.is_some() {
                    self.status = s.status;
                }
            }
            Some(Update::Action(a)) => {
                self.count_event(1, now_s);
                self.recent.push_front(a);
                self.recent.truncate(RECENT);
            }
            Some(Update::RoutingDecision(_)) => self.count_event(0, now_s),
            Some(Update::Transformation(_)) => self.count_event(2, now_s),
            Some(Update::PerformanceMetric(_)) => self.count_event(3, now_s),
            Some(Update::AgentMetrics(m)) => {
                self.agents.insert(m.agent.clone(), m);
            }
            Some(Update::ConsumerStatus(s)) => self.status = Some(s),
            Some(Update::Lagged(l)) => {
                self.notice = format!("missed {} updates", l.missed);
            }
            None => {}
        }
    }
}

fn pct(v: Option<f64>) -> String {
    v.map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn num(v: Option<f64>, unit: &str) -> String {
    v.map(|r| format!("{r:.1}{unit}"))
        .unwrap_or_else(|| "-".into())
}

fn clock(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format("%H:%M:%S").to_string())
        .unwrap_or_default()
}

/// Draws the dashboard.
pub fn draw(f: &mut Frame, d: &Dashboard) {
    let [header, agents, spark, recent, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Percentage(45),
        Constraint::Length(5),
        Constraint::Min(5),
        Constraint::Length(1),
    ])
    .areas(f.area());

    let (lag, events, conn) = match &d.status {
        Some(s) => (
            s.partitions.iter().map(|p| p.lag.max(0)).sum::<i64>(),
            s.events_processed,
            Some(s.connected),
        ),
        None => (0, 0, None),
    };
    let state = if !d.connected {
        Span::styled(
            " reconnecting ",
            Style::default().fg(Color::Black).bg(Color::Red),
        )
    } else if conn.is_none() {
        Span::styled(
            " connecting ",
            Style::default().fg(Color::Black).bg(Color::Yellow),
        )
    } else if conn == Some(true) {
        Span::styled(" live ", Style::default().fg(Color::Black).bg(Color::Green))
    } else {
        Span::styled(
            " broker down ",
            Style::default().fg(Color::Black).bg(Color::Yellow),
        )
    };
    let line = Line::from(vec![
        state,
        Span::raw(format!(
            "  {:.0} events/s   {} events consumed   lag {}   {} agents   seq {}",
            d.rate(),
            events,
            lag,
            d.agents.len(),
            d.sequence
        )),
    ]);
    f.render_widget(
        Paragraph::new(vec![
            line,
            Line::from(Span::styled(
                d.notice.clone(),
                Style::default().fg(Color::Yellow),
            )),
        ])
        .block(
            Block::default()
                .borders(Borders::TOP)
                .title(format!(" omnibus top - consumer-svc {} ", d.addr)),
        ),
        header,
    );

    let mut agents_sorted: Vec<&pb::AgentMetrics> = d.agents.values().collect();
    agents_sorted.sort_by(|a, b| {
        (b.total_actions + b.total_requests)
            .cmp(&(a.total_actions + a.total_requests))
            .then_with(|| a.agent.cmp(&b.agent))
    });
    let rows = agents_sorted.iter().map(|a| {
        Row::new(vec![
            Cell::from(a.agent.clone()),
            Cell::from(a.total_requests.to_string()),
            Cell::from(a.total_actions.to_string()),
            Cell::from(a.successes.to_string()),
            Cell::from(a.errors.to_string()),
            Cell::from(pct(a.success_rate)),
            Cell::from(num(a.avg_routing_time_ms, "ms")),
            Cell::from(num(a.avg_confidence.map(|c| c * 100.0), "%")),
            Cell::from(clock(&a.last_seen)),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(24),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Fill(1),
        ],
    )
    .header(
        Row::new([
            "agent",
            "requests",
            "actions",
            "success",
            "errors",
            "success%",
            "avg route",
            "avg conf",
            "last seen",
        ])
        .style(Style::default().add_modifier(Modifier::BOLD)),
    )
    .block(
        Block::default()
            .borders(Borders::TOP)
            .title(" agents (24 h) "),
    );
    f.render_widget(table, agents);

    // Newest on the right: as many seconds as the sparkline is wide.
    let width = spark.width as usize;
    let data: Vec<u64> = d
        .per_second
        .iter()
        .skip(d.per_second.len().saturating_sub(width))
        .copied()
        .collect();
    f.render_widget(
        Sparkline::default()
            .block(Block::default().borders(Borders::TOP).title(format!(
                " throughput per second - since start: {} decisions, {} actions, {} transformations, {} perf metrics ",
                d.totals[0], d.totals[1], d.totals[2], d.totals[3]
            )))
            .data(&data)
            .style(Style::default().fg(Color::Cyan)),
        spark,
    );

    let rows = d.recent.iter().map(|a| {
        let style = match a.action_type.as_str() {
            "error" => Style::default().fg(Color::Red),
            "success" => Style::default().fg(Color::Green),
            _ => Style::default(),
        };
        Row::new(vec![
            Cell::from(clock(&a.timestamp)),
            Cell::from(a.agent_name.clone()),
            Cell::from(a.action_type.clone()),
            Cell::from(a.action_name.clone().unwrap_or_default()),
            Cell::from(num(a.duration_ms, "ms")),
        ])
        .style(style)
    });
    f.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(9),
                Constraint::Length(24),
                Constraint::Length(10),
                Constraint::Length(16),
                Constraint::Fill(1),
            ],
        )
        .header(
            Row::new(["time", "agent", "type", "action", "duration"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(
            Block::default()
                .borders(Borders::TOP)
                .title(" recent actions "),
        ),
        recent,
    );
    f.render_widget(Paragraph::new(" q quit"), footer);
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

pub async fn run(cli: &Cli, args: &TopArgs) -> Result<ExitCode> {
    if !std::io::stdout().is_terminal() {
        return Err(Fail(
            "omnibus top needs a terminal; use `omnibus tail` when the output is piped".into(),
        ));
    }
    connect(Svc::Consumer, &cli.consumer_addr).await?;
    let dash = Arc::new(Mutex::new(Dashboard::new(&cli.consumer_addr)));

    let (tx, mut rx) = mpsc::channel(4096);
    let req = pb::SubscribeRequest {
        agent: args.agent.clone(),
        include_snapshot: true,
        ..Default::default()
    };
    let follower = tokio::spawn(stream::follow(cli.consumer_addr.clone(), req, tx));
    let feeder = {
        let dash = dash.clone();
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let mut d = dash.lock();
                match item {
                    Item::Update(msg) => d.apply(*msg, now_s()),
                    Item::Notice(n) => d.notice = n,
                    Item::Connected(c) => d.connected = c,
                    Item::Fatal(e) => {
                        d.fatal = Some(e.0);
                        d.connected = false;
                    }
                }
            }
        })
    };
    // The lag and counters come from GetConsumerStatus (the stream only pushes changes).
    let poller = {
        let dash = dash.clone();
        let addr = cli.consumer_addr.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(ch) = connect(Svc::Consumer, &addr).await {
                    let mut client = ConsumerServiceClient::new(ch);
                    while let Ok(r) = client
                        .get_consumer_status(pb::GetConsumerStatusRequest {})
                        .await
                    {
                        if let Some(s) = r.into_inner().status {
                            dash.lock().status = Some(s);
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let refresh = args.refresh;
    // SIGTERM / SIGHUP (a `kill`, a closed terminal window) end the dashboard like `q`, so the
    // terminal is restored instead of left in raw mode on the alternate screen.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let signals = {
        let stop = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let ui = {
        let dash = dash.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut terminal = ratatui::try_init().inspect_err(|_| ratatui::restore())?;
            let result = (|| loop {
                {
                    let mut d = dash.lock();
                    d.tick(now_s());
                    if d.fatal.is_some() || stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return Ok(());
                    }
                    terminal.draw(|f| draw(f, &d))?;
                }
                if event::poll(refresh)?
                    && let Event::Key(k) = event::read()?
                {
                    let quit = k.kind == KeyEventKind::Press
                        && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                            || (k.code == KeyCode::Char('c')
                                && k.modifiers.contains(KeyModifiers::CONTROL)));
                    if quit {
                        return Ok(());
                    }
                }
            })();
            ratatui::restore();
            result
        })
    };
    let result = ui.await;
    follower.abort();
    feeder.abort();
    poller.abort();
    signals.abort();
    if let Some(e) = dash.lock().fatal.take() {
        return Err(Fail(e));
    }
    match result {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(Fail(format!("the terminal failed: {e}"))),
        Err(e) => Err(Fail(format!("the dashboard stopped: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    #[test]
    fn the_dashboard_shows_agents_throughput_and_actions() {
        let mut d = Dashboard::new("127.0.0.1:50051");
        d.connected = true;
        d.status = Some(pb::ConsumerStatus {
            connected: true,
            events_processed: 12,
            ..Default::default()
        });
        d.apply(
            pb::SubscribeResponse {
                sequence: 3,
                update: Some(Update::Snapshot(pb::Snapshot {
                    agents: vec![pb::AgentMetrics {
                        agent: "coder".into(),
                        total_requests: 4,
                        total_actions: 9,
                        success_rate: Some(0.75),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            },
            100,
        );
        for i in 0..10 {
            d.apply(
                pb::SubscribeResponse {
                    sequence: 4 + i,
                    update: Some(Update::Action(pb::AgentAction {
                        agent_name: "tester".into(),
                        action_type: "error".into(),
                        action_name: Some("Bash".into()),
                        ..Default::default()
                    })),
                },
                100 + i / 5,
            );
        }
        d.tick(102);
        assert_eq!(d.totals[1], 10);
        // 10 events over the last five complete seconds.
        assert!((d.rate() - 2.0).abs() < 1e-9, "{}", d.rate());
        let mut term = Terminal::new(TestBackend::new(120, 40)).unwrap();
        term.draw(|f| draw(f, &d)).unwrap();
        let screen: String = term
            .backend()
            .buffer()
            .content()
            .chunks(120)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
            .collect();
        for want in [
            "omnibus top",
            "live",
            "12 events consumed",
            "coder",
            "75.0%",
            "tester",
            "Bash",
            "events/s",
            "q quit",
        ] {
            assert!(screen.contains(want), "{want} missing:\n{screen}");
        }
    }
}
