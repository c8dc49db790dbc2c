package tenkisandbox

import (
	"context"
	"errors"
	"io"
	"strings"
	"time"

	"google.golang.org/grpc"
)

// SessionState is a session's state without the wire's prefix ("RUNNING").
type SessionState string

// Session states.
const (
	SessionStateUnspecified  SessionState = "UNSPECIFIED"
	SessionStateCreating     SessionState = "CREATING"
	SessionStateRunning      SessionState = "RUNNING"
	SessionStatePaused       SessionState = "PAUSED"
	SessionStateTerminating  SessionState = "TERMINATING"
	SessionStateTerminated   SessionState = "TERMINATED"
	SessionStatePausing      SessionState = "PAUSING"
	SessionStateResuming     SessionState = "RESUMING"
	SessionStateUserShutdown SessionState = "USER_SHUTDOWN"
)

// Ready is true for RUNNING only.
func (s SessionState) Ready() bool { return s == SessionStateRunning }

// Terminal is true for TERMINATING and TERMINATED.
func (s SessionState) Terminal() bool {
	return s == SessionStateTerminating || s == SessionStateTerminated
}

// Session is a sandbox session (tenki.sandbox.v1.SandboxSession).
type Session struct {
	ID               string
	Name             string
	State            SessionState
	WorkspaceID      string
	OwnerType        string
	OwnerID          string
	CPUCores         int
	MemoryMB         int
	DiskSizeGB       int
	Tags             []string
	Metadata         map[string]string
	SnapshotID       string // snapshot_id, when set
	SourceSnapshotID string // the snapshot this session was restored from
	InboundEnabled   bool
	OutboundEnabled  bool
	CreatedAt        time.Time
	ReadyAt          time.Time
	TerminatedAt     time.Time
	TimeoutAt        time.Time
	TerminalError    string

	// DataPlaneEndpoint is where exec and file calls go, when the server said so.
	DataPlaneEndpoint string
}

func sessionFrom(m msg) *Session {
	if !m.valid() {
		return nil
	}
	return &Session{
		ID:               m.str("id"),
		Name:             m.str("name"),
		State:            SessionState(m.enumName("state", "SESSION_STATE_")),
		WorkspaceID:      m.str("workspace_id"),
		OwnerType:        m.str("owner_type"),
		OwnerID:          m.str("owner_id"),
		CPUCores:         int(m.int("cpu_cores")),
		MemoryMB:         int(m.int("memory_mb")),
		DiskSizeGB:       int(m.int("disk_size_gb")),
		Tags:             m.strs("tags"),
		Metadata:         m.strMap("metadata"),
		SnapshotID:       m.str("snapshot_id"),
		SourceSnapshotID: m.str("source_snapshot_id"),
		InboundEnabled:   m.boolean("inbound_enabled"),
		OutboundEnabled:  m.boolean("outbound_enabled"),
		CreatedAt:        m.timestamp("created_at"),
		ReadyAt:          m.timestamp("ready_at"),
		TerminatedAt:     m.timestamp("terminated_at"),
		TimeoutAt:        m.timestamp("timeout_at"),
		TerminalError:    m.str("terminal_error"),
	}
}

// VolumeMount attaches a volume at creation.
type VolumeMount struct {
	VolumeID  string
	MountPath string
	ReadOnly  bool
}

type createConfig struct {
	name, snapshotID, templateSpecID string
	cpu, memoryMB, diskGB            *int
	tags                             []string
	env, metadata                    map[string]string
	volumes                          []VolumeMount
	maxDuration                      time.Duration
	idleTimeoutMinutes               *int
	workspaceID                      string
	noWait                           bool
	waitTimeout                      time.Duration
	allowInbound, allowOutbound      *bool
}

// CreateOption configures Create.
type CreateOption func(*createConfig)

// WithSnapshot restores the session from a snapshot (a new session with a new id).
func WithSnapshot(snapshotID string) CreateOption {
	return func(c *createConfig) { c.snapshotID = snapshotID }
}

// WithName names the session.
func WithName(name string) CreateOption { return func(c *createConfig) { c.name = name } }

// WithCPU sets the number of vCPUs.
func WithCPU(cores int) CreateOption { return func(c *createConfig) { c.cpu = &cores } }

// WithMemoryMB sets the memory in MiB.
func WithMemoryMB(mb int) CreateOption { return func(c *createConfig) { c.memoryMB = &mb } }

// WithDiskSizeGB sets the disk size in GiB.
func WithDiskSizeGB(gb int) CreateOption { return func(c *createConfig) { c.diskGB = &gb } }

// WithTags tags the session (tags are lower-cased, as Tenki's SDKs do).
func WithTags(tags ...string) CreateOption {
	return func(c *createConfig) {
		for _, t := range tags {
			c.tags = append(c.tags, strings.ToLower(t))
		}
	}
}

// WithEnv sets environment variables for the session.
func WithEnv(env map[string]string) CreateOption {
	return func(c *createConfig) {
		if c.env == nil {
			c.env = map[string]string{}
		}
		for k, v := range env {
			c.env[k] = v
		}
	}
}

// WithMetadata sets metadata on the session.
func WithMetadata(md map[string]string) CreateOption {
	return func(c *createConfig) {
		if c.metadata == nil {
			c.metadata = map[string]string{}
		}
		for k, v := range md {
			c.metadata[k] = v
		}
	}
}

// WithVolume attaches a volume at mountPath.
func WithVolume(volumeID, mountPath string, readOnly bool) CreateOption {
	return func(c *createConfig) {
		c.volumes = append(c.volumes, VolumeMount{VolumeID: volumeID, MountPath: mountPath, ReadOnly: readOnly})
	}
}

// WithTemplate creates the session from a template spec.
func WithTemplate(templateID string) CreateOption {
	return func(c *createConfig) { c.templateSpecID = templateID }
}

// WithMaxDuration bounds the session's lifetime.
func WithMaxDuration(d time.Duration) CreateOption {
	return func(c *createConfig) { c.maxDuration = d }
}

// WithIdleTimeoutMinutes sets the idle timeout.
func WithIdleTimeoutMinutes(m int) CreateOption {
	return func(c *createConfig) { c.idleTimeoutMinutes = &m }
}

// WithWorkspace creates the session in another workspace than the key's.
func WithWorkspace(id string) CreateOption { return func(c *createConfig) { c.workspaceID = id } }

// WithInbound / WithOutbound set allow_inbound / allow_outbound (default true, as the SDKs send).
func WithInbound(allow bool) CreateOption  { return func(c *createConfig) { c.allowInbound = &allow } }
func WithOutbound(allow bool) CreateOption { return func(c *createConfig) { c.allowOutbound = &allow } }

// WithWaitTimeout bounds the wait for RUNNING (default DefaultSessionWaitTimeout).
func WithWaitTimeout(d time.Duration) CreateOption {
	return func(c *createConfig) { c.waitTimeout = d }
}

// WithoutWait returns as soon as the session is created (usually CREATING).
func WithoutWait() CreateOption { return func(c *createConfig) { c.noWait = true } }

// Create creates a session and waits until it is RUNNING (WaitSession, or GetSession polling
// every 0.5 s where the server does not implement WaitSession).
//
// When the session was created but did not become RUNNING, Create returns the session as
// last seen *and* an error (ErrSessionTerminated if it ended, ErrSessionWaitTimeout,
// ErrWaitReadyFailed otherwise), so the caller can still terminate it.
func (c *Client) Create(ctx context.Context, opts ...CreateOption) (*Session, error) {
	cfg := createConfig{waitTimeout: DefaultSessionWaitTimeout}
	for _, o := range opts {
		o(&cfg)
	}
	req := newMsg("CreateSessionRequest").
		set("owner_id", "self").set("owner_type", "SERVICE")
	inbound, outbound := true, true
	if cfg.allowInbound != nil {
		inbound = *cfg.allowInbound
	}
	if cfg.allowOutbound != nil {
		outbound = *cfg.allowOutbound
	}
	req.set("allow_inbound", inbound).set("allow_outbound", outbound)
	if cfg.name != "" {
		req.set("name", cfg.name)
	}
	if cfg.snapshotID != "" {
		req.set("snapshot_id", cfg.snapshotID)
	}
	if cfg.templateSpecID != "" {
		req.set("template_spec_id", cfg.templateSpecID)
	}
	if cfg.workspaceID != "" {
		req.set("workspace_id", cfg.workspaceID)
	}
	if cfg.cpu != nil {
		req.set("cpu_cores", *cfg.cpu)
	}
	if cfg.memoryMB != nil {
		req.set("memory_mb", *cfg.memoryMB)
	}
	if cfg.diskGB != nil {
		req.set("disk_size_gb", *cfg.diskGB)
	}
	if cfg.idleTimeoutMinutes != nil {
		req.set("idle_timeout_minutes", *cfg.idleTimeoutMinutes)
	}
	if len(cfg.tags) > 0 {
		req.set("tags", cfg.tags)
	}
	if len(cfg.env) > 0 {
		req.set("env", cfg.env)
	}
	if len(cfg.metadata) > 0 {
		req.set("metadata", cfg.metadata)
	}
	if cfg.maxDuration > 0 {
		req.set("max_duration", cfg.maxDuration)
	}
	for _, v := range cfg.volumes {
		vm := req.appendMsg("volumes")
		vm.set("volume_id", v.VolumeID).set("mount_path", v.MountPath).set("readonly", v.ReadOnly)
	}
	resp, err := c.call(ctx, "CreateSession", req)
	if err != nil {
		return nil, err
	}
	s := c.routed(resp)
	if cfg.noWait || s.State.Ready() {
		return s, nil
	}
	return c.waitRunning(ctx, s, cfg.waitTimeout)
}

// routed reads a CreateSession/WaitSession answer and keeps its data-plane route.
func (c *Client) routed(resp msg) *Session {
	s := sessionFrom(resp.sub("session"))
	if s == nil {
		s = &Session{State: SessionStateUnspecified}
	}
	s.DataPlaneEndpoint = resp.str("data_plane_endpoint")
	if cred := resp.sub("credential"); cred.valid() && cred.str("credential") != "" && s.DataPlaneEndpoint != "" {
		c.keepRoute(s.ID, s.DataPlaneEndpoint, cred.str("credential"), cred.timestamp("expires_at"))
	}
	return s
}

// WaitReady waits until the session is RUNNING (timeout <= 0: DefaultSessionWaitTimeout).
func (c *Client) WaitReady(ctx context.Context, sessionID string, timeout time.Duration) (*Session, error) {
	s, err := c.GetSession(ctx, sessionID)
	if err != nil {
		return nil, err
	}
	if s.State.Ready() {
		return s, nil
	}
	return c.waitRunning(ctx, s, timeout)
}

func (c *Client) waitRunning(ctx context.Context, s *Session, timeout time.Duration) (*Session, error) {
	if timeout <= 0 {
		timeout = DefaultSessionWaitTimeout
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	last, err := c.waitStream(wctx, s)
	var e *Error
	streamBroke := errors.As(err, &e) && e.Retryable && wctx.Err() == nil
	if errors.Is(err, ErrUnimplemented) || streamBroke ||
		(err == nil && (last == nil || (!last.State.Ready() && !last.State.Terminal()))) {
		last, err = c.waitPoll(wctx, s.ID)
	}
	if last == nil {
		last = s
	}
	switch {
	case err == nil && last.State.Ready():
		return last, nil
	case err == nil && last.State.Terminal():
		msg := "session " + last.ID + " entered terminal state " + string(last.State)
		if last.TerminalError != "" {
			msg += ": " + last.TerminalError
		}
		return last, &Error{Kind: ErrSessionTerminated, Op: "Create", Message: msg, Session: last}
	case err == nil:
		return last, &Error{Kind: ErrWaitReadyFailed, Op: "Create", Message: "session " + last.ID + " is " + string(last.State), Session: last}
	case wctx.Err() != nil && ctx.Err() == nil:
		return last, &Error{Kind: ErrSessionWaitTimeout, Op: "Create",
			Message: "session " + last.ID + " not RUNNING after " + timeout.String() + " (state " + string(last.State) + ")",
			Session: last, cause: context.DeadlineExceeded}
	default:
		if errors.As(err, &e) && e.Session == nil {
			e.Session = last
		}
		return last, err
	}
}

// waitStream reads WaitSession until RUNNING or a terminal state; the last session seen.
func (c *Client) waitStream(ctx context.Context, s *Session) (*Session, error) {
	cc, err := c.conn(c.endpoint)
	if err != nil {
		return nil, err
	}
	sctx, cancel := c.controlCtx(ctx, false)
	defer cancel()
	sctx, stop := context.WithCancel(sctx)
	defer stop()
	desc := &grpc.StreamDesc{StreamName: "WaitSession", ServerStreams: true}
	st, err := cc.NewStream(sctx, desc, methodPath(ControlService, "WaitSession"))
	if err != nil {
		return nil, mapError("WaitSession", sctx, err)
	}
	if err := st.SendMsg(newMsg("WaitSessionRequest").set("session_id", s.ID).proto()); err != nil && err != io.EOF {
		return nil, mapError("WaitSession", sctx, err)
	}
	if err := st.CloseSend(); err != nil {
		return nil, mapError("WaitSession", sctx, err)
	}
	var last *Session
	for {
		out := NewMessage("WaitSessionResponse")
		if err := st.RecvMsg(out); err != nil {
			if err == io.EOF {
				return last, nil
			}
			return last, mapError("WaitSession", sctx, err)
		}
		last = c.routed(wrap(out))
		if last.State.Ready() || last.State.Terminal() {
			return last, nil
		}
	}
}

// waitPoll polls GetSession every 0.5 s until RUNNING or a terminal state.
func (c *Client) waitPoll(ctx context.Context, id string) (*Session, error) {
	var last *Session
	for {
		s, err := c.GetSession(ctx, id)
		if err != nil {
			return last, err
		}
		last = s
		if s.State.Ready() || s.State.Terminal() {
			return s, nil
		}
		if err := sleep(ctx, pollInterval); err != nil {
			return last, mapError("GetSession", ctx, err)
		}
	}
}

// GetSession reads a session (ErrSessionNotFound when there is none).
func (c *Client) GetSession(ctx context.Context, sessionID string) (*Session, error) {
	resp, err := c.call(ctx, "GetSession", newMsg("GetSessionRequest").set("session_id", sessionID))
	if err != nil {
		return nil, err
	}
	return sessionFrom(resp.sub("session")), nil
}

// Get is GetSession.
func (c *Client) Get(ctx context.Context, sessionID string) (*Session, error) {
	return c.GetSession(ctx, sessionID)
}

// Terminate terminates a session and returns it as the server answered.
func (c *Client) Terminate(ctx context.Context, sessionID string) (*Session, error) {
	resp, err := c.call(ctx, "TerminateSession", newMsg("TerminateSessionRequest").set("session_id", sessionID))
	c.dropRoute(sessionID)
	if err != nil {
		return nil, err
	}
	return sessionFrom(resp.sub("session")), nil
}

// ListSessions lists the caller's sessions (ListSessions RPC, every page).
func (c *Client) ListSessions(ctx context.Context, includeTerminated bool) ([]*Session, error) {
	var out []*Session
	newReq := func() msg {
		return newMsg("ListSessionsRequest").set("include_terminated", includeTerminated)
	}
	err := c.eachPage(ctx, "ListSessions", newReq, "sessions", func(m msg) { out = append(out, sessionFrom(m)) })
	if err != nil {
		return nil, err
	}
	return out, nil
}
