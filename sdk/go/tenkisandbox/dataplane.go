package tenkisandbox

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

// route is a session's data-plane address and credential.
type route struct {
	endpoint   string
	credential string
	renewAt    time.Time // half the credential's lifetime
}

const (
	sessionCertHeader = "x-tenki-session-cert"
	establishRetryFor = 30 * time.Second
	startedWait       = 30 * time.Second
	stdinChunk        = 64 << 10
)

func (c *Client) keepRoute(sessionID, endpoint, credential string, expires time.Time) {
	now := time.Now()
	renew := now.Add(time.Minute)
	if !expires.IsZero() && expires.After(now) {
		renew = now.Add(expires.Sub(now) / 2)
	}
	c.mu.Lock()
	c.routes[sessionID] = &route{endpoint: endpoint, credential: credential, renewAt: renew}
	c.mu.Unlock()
}

func (c *Client) dropRoute(sessionID string) {
	c.mu.Lock()
	delete(c.routes, sessionID)
	c.mu.Unlock()
}

// routeFor is the session's data-plane route, from the cache or CreateSessionCredential.
func (c *Client) routeFor(ctx context.Context, sessionID string, fresh bool) (*route, error) {
	c.mu.Lock()
	r := c.routes[sessionID]
	c.mu.Unlock()
	if r != nil && !fresh && time.Now().Before(r.renewAt) {
		return r, nil
	}
	resp, err := c.call(ctx, "CreateSessionCredential",
		newMsg("CreateSessionCredentialRequest").set("session_id", sessionID))
	if err != nil {
		return nil, err
	}
	cred := resp.sub("credential")
	endpoint := resp.str("data_plane_endpoint")
	if endpoint == "" {
		endpoint = c.endpoint // a server that serves both planes on one address
	}
	c.keepRoute(sessionID, endpoint, cred.str("credential"), cred.timestamp("expires_at"))
	c.mu.Lock()
	r = c.routes[sessionID]
	c.mu.Unlock()
	return r, nil
}

func dataCtx(ctx context.Context, r *route) context.Context {
	// the data plane gets the session credential only, never the API key
	return metadata.NewOutgoingContext(ctx, metadata.Pairs(sessionCertHeader, r.credential))
}

// retryable says whether a data-plane call may be tried again while the route settles.
func establishRetryable(err error) bool {
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	switch {
	case e.started:
		return false // the command may have run: never run it twice
	case e.Kind == ErrDataPlaneNotReady, e.Code == codes.Unavailable:
		return true
	case e.Code == codes.NotFound && strings.Contains(strings.ToLower(e.Message), "session") &&
		strings.Contains(strings.ToLower(e.Message), "provision"):
		return true
	}
	return false
}

// dataCall runs one data-plane attempt function with route renewal and establishment retries.
func (c *Client) dataCall(ctx context.Context, op, sessionID string, attempt func(context.Context, *grpc.ClientConn, *route) error) error {
	deadline := time.Now().Add(establishRetryFor)
	renewed := false
	for {
		r, err := c.routeFor(ctx, sessionID, false)
		if err != nil {
			return err
		}
		cc, err := c.conn(r.endpoint)
		if err != nil {
			return err
		}
		err = attempt(ctx, cc, r)
		if err == nil {
			return nil
		}
		var e *Error
		if errors.As(err, &e) && e.Kind == ErrUnauthorized && !renewed {
			renewed = true
			c.dropRoute(sessionID) // the credential expired or was revoked: get another once
			continue
		}
		if establishRetryable(err) && time.Now().Before(deadline) && ctx.Err() == nil {
			if serr := sleep(ctx, pollInterval); serr != nil {
				return mapError(op, ctx, serr)
			}
			continue
		}
		return err
	}
}

func (c *Client) dataUnary(ctx context.Context, method, sessionID string, inner msg) (msg, error) {
	var out msg
	err := c.dataCall(ctx, method, sessionID, func(ctx context.Context, cc *grpc.ClientConn, r *route) error {
		req := newMsg("SandboxSessionDataPlaneService" + method + "Request")
		req.set("request", inner)
		resp := NewMessage("SandboxSessionDataPlaneService" + method + "Response")
		cctx := dataCtx(ctx, r)
		if c.timeout > 0 {
			var cancel context.CancelFunc
			cctx, cancel = context.WithTimeout(cctx, c.timeout)
			defer cancel()
		}
		if err := cc.Invoke(cctx, methodPath(DataPlaneService, method), req.proto(), resp); err != nil {
			return mapError(method, cctx, err)
		}
		out = wrap(resp).sub("response")
		return nil
	})
	return out, err
}

// WriteFile writes content to path in the session (a relative path is under the guest
// user's home, /home/tenki). It returns the size the server wrote.
func (c *Client) WriteFile(ctx context.Context, sessionID, path string, content []byte) (int64, error) {
	inner := newMsg("WriteFileRequest").set("session_id", sessionID).set("path", path).set("content", content)
	out, err := c.dataUnary(ctx, "WriteFile", sessionID, inner)
	if err != nil {
		return 0, err
	}
	return out.int("size_bytes"), nil
}

// ReadFile reads a whole file of the session (ErrFileNotFound when it does not exist).
func (c *Client) ReadFile(ctx context.Context, sessionID, path string) ([]byte, error) {
	inner := newMsg("ReadFileRequest").set("session_id", sessionID).set("path", path)
	out, err := c.dataUnary(ctx, "ReadFile", sessionID, inner)
	if err != nil {
		return nil, err
	}
	return out.bytes("content"), nil
}

// FileInfo is what Stat reports.
type FileInfo struct {
	Path          string
	Exists        bool
	Size          int64
	Mode          uint32
	ModTime       time.Time
	IsDir         bool
	IsSymlink     bool
	SymlinkTarget string
}

// Stat describes path in the session; a missing path is ErrFileNotFound.
func (c *Client) Stat(ctx context.Context, sessionID, path string) (*FileInfo, error) {
	inner := newMsg("StatRequest").set("session_id", sessionID).set("path", path)
	out, err := c.dataUnary(ctx, "Stat", sessionID, inner)
	if err != nil {
		return nil, err
	}
	fi := &FileInfo{
		Path: path, Exists: out.boolean("exists"), Size: out.int("size"), Mode: uint32(out.int("mode")),
		IsDir: out.boolean("is_dir"), IsSymlink: out.boolean("is_symlink"), SymlinkTarget: out.str("symlink_target"),
	}
	if ns := out.int("modified_unix_ns"); ns != 0 {
		fi.ModTime = time.Unix(0, ns).UTC()
	}
	if !fi.Exists {
		return fi, &Error{Kind: ErrFileNotFound, Op: "Stat", Message: "no such file or directory: " + path}
	}
	return fi, nil
}

// ExecOptions are Exec's optional settings; nil means none.
type ExecOptions struct {
	Cwd        string            // "" = the default workdir (/home/tenki)
	Env        map[string]string // extra environment
	Timeout    time.Duration     // the server kills the command after this; 0 = unbounded
	Stdin      []byte            // sent, then stdin is closed
	Privileged bool              // run as root
	PTY        bool
}

// ExecResult is a finished command.
type ExecResult struct {
	ExitCode int
	Signal   string
	TimedOut bool
	Stdout   []byte
	Stderr   []byte
	Duration time.Duration
	Reason   string
	PID      uint64
}

// OK is exit 0, no signal, not timed out.
func (r *ExecResult) OK() bool { return r.ExitCode == 0 && r.Signal == "" && !r.TimedOut }

// Exec runs cmd (argv) in the session over the data plane's Run stream and collects its output.
// A non-zero exit is not an error; look at the result.
func (c *Client) Exec(ctx context.Context, sessionID string, cmd []string, opts *ExecOptions) (*ExecResult, error) {
	if len(cmd) == 0 || cmd[0] == "" {
		return nil, clientError("Exec", ErrInvalidArgument, "command must not be empty")
	}
	if opts == nil {
		opts = &ExecOptions{}
	}
	var res *ExecResult
	err := c.dataCall(ctx, "Run", sessionID, func(ctx context.Context, cc *grpc.ClientConn, r *route) error {
		var err error
		res, err = c.run(ctx, cc, r, sessionID, cmd, opts)
		return err
	})
	if err != nil {
		return nil, err
	}
	return res, nil
}

func runFrame(build func(frame msg)) msg {
	req := newMsg("SandboxSessionDataPlaneServiceRunRequest")
	build(req.mutable("frame"))
	return req
}

func (c *Client) run(ctx context.Context, cc *grpc.ClientConn, r *route, sessionID string, cmd []string, opts *ExecOptions) (*ExecResult, error) {
	sctx, cancel := context.WithCancel(dataCtx(ctx, r))
	defer cancel()
	desc := &grpc.StreamDesc{StreamName: "Run", ServerStreams: true, ClientStreams: true}
	st, err := cc.NewStream(sctx, desc, methodPath(DataPlaneService, "Run"))
	if err != nil {
		return nil, mapError("Run", sctx, err)
	}
	start := runFrame(func(f msg) {
		s := f.mutable("start")
		s.set("session_id", sessionID).set("cmd", cmd).set("stream_stdin", true)
		if opts.Cwd != "" {
			s.set("cwd", opts.Cwd)
		}
		if len(opts.Env) > 0 {
			s.set("env", opts.Env)
		}
		if opts.PTY {
			s.set("pty", true)
		}
		if opts.Timeout > 0 {
			s.set("timeout_ms", uint32(opts.Timeout/time.Millisecond))
		}
		if opts.Privileged {
			s.set("privileged", true)
		}
	})
	if err := st.SendMsg(start.proto()); err != nil && err != io.EOF {
		return nil, mapError("Run", sctx, err)
	}

	type frame struct {
		m   msg
		err error
	}
	frames := make(chan frame, 64)
	go func() {
		defer close(frames)
		for {
			out := NewMessage("SandboxSessionDataPlaneServiceRunResponse")
			if err := st.RecvMsg(out); err != nil {
				frames <- frame{err: err}
				return
			}
			select {
			case frames <- frame{m: wrap(out).sub("frame")}:
			case <-sctx.Done():
				return
			}
		}
	}()

	res := &ExecResult{}
	var window int64 = -1 // stdin bytes we may still send; -1 = unbounded
	var windowMu sync.Mutex
	grants := make(chan struct{}, 1)

	handle := func(f msg) (done bool) {
		switch f.oneofCase("payload") {
		case "started":
			s := f.sub("started")
			res.PID = uint64(s.int("pid"))
			if w := s.int("stdin_window_bytes"); w > 0 {
				windowMu.Lock()
				window = w
				windowMu.Unlock()
			}
		case "stdout":
			res.Stdout = append(res.Stdout, f.bytes("stdout")...)
		case "stderr":
			res.Stderr = append(res.Stderr, f.bytes("stderr")...)
		case "flow":
			windowMu.Lock()
			if window >= 0 {
				window += f.sub("flow").int("stdin_grant_bytes")
			}
			windowMu.Unlock()
			select {
			case grants <- struct{}{}:
			default:
			}
		case "exit":
			e := f.sub("exit")
			res.ExitCode = int(e.int("exit_code"))
			res.Signal = e.str("signal")
			res.TimedOut = e.boolean("timed_out")
			res.Duration = time.Duration(e.int("duration_ms")) * time.Millisecond
			res.Reason = e.str("reason")
			return true
		}
		return false
	}

	// 1. wait for started (the server must answer before we half-close)
	timer := time.NewTimer(startedWait)
	defer timer.Stop()
	started := false
	exited := false
	for !started && !exited {
		select {
		case fr, ok := <-frames:
			if !ok {
				return nil, clientError("Run", ErrSandbox, "stream closed before the command started")
			}
			if fr.err != nil {
				return nil, runEnd("Run", sctx, fr.err)
			}
			if fr.m.oneofCase("payload") == "started" {
				started = true
			}
			exited = handle(fr.m)
		case <-timer.C:
			return nil, clientError("Run", ErrCommandTimeout, "no started frame within %s", startedWait)
		case <-ctx.Done():
			return nil, mapError("Run", ctx, ctx.Err())
		}
	}

	// 2. stdin (within the window the server grants), then stdin_close; meanwhile keep reading
	sendErr := make(chan error, 1)
	go func() {
		data := opts.Stdin
		for len(data) > 0 && sctx.Err() == nil {
			n := min(len(data), stdinChunk)
			windowMu.Lock()
			w := window
			windowMu.Unlock()
			if w == 0 {
				select {
				case <-grants:
					continue
				case <-sctx.Done():
					sendErr <- nil
					return
				}
			}
			if w > 0 && int64(n) > w {
				n = int(w)
			}
			chunk := data[:n]
			if err := st.SendMsg(runFrame(func(f msg) { f.set("stdin", chunk) }).proto()); err != nil {
				sendErr <- nil // the receive side reports the stream's end
				return
			}
			windowMu.Lock()
			if window > 0 {
				window -= int64(n)
			}
			windowMu.Unlock()
			data = data[n:]
		}
		_ = st.SendMsg(runFrame(func(f msg) { f.set("stdin_close", true) }).proto())
		_ = st.CloseSend()
		sendErr <- nil
	}()

	// 3. output until exit
	for !exited {
		select {
		case fr, ok := <-frames:
			if !ok {
				return nil, clientError("Run", ErrSandbox, "stream closed before the exit frame")
			}
			if fr.err != nil {
				return nil, noRetry(runEnd("Run", sctx, fr.err))
			}
			exited = handle(fr.m)
		case <-ctx.Done():
			return nil, mapError("Run", ctx, ctx.Err())
		}
	}
	cancel()
	<-sendErr
	if err := exitReasonError(res); err != nil {
		return res, err
	}
	return res, nil
}

func noRetry(err error) error {
	var e *Error
	if errors.As(err, &e) {
		e.started = true
	}
	return err
}

func runEnd(op string, ctx context.Context, err error) error {
	if err == io.EOF {
		return clientError(op, ErrSandbox, "stream ended before the exit frame")
	}
	return mapError(op, ctx, err)
}

// exitReasonError reads the meaningful prefixes of RunExit.reason.
func exitReasonError(r *ExecResult) error {
	switch {
	case strings.HasPrefix(r.Reason, "session_terminated"):
		return &Error{Kind: ErrSessionTerminated, Op: "Run", Message: r.Reason}
	case strings.HasPrefix(r.Reason, "first_frame_timeout"):
		return &Error{Kind: ErrCommandTimeout, Op: "Run", Message: r.Reason}
	case strings.HasPrefix(r.Reason, "capability_unavailable"):
		return &Error{Kind: ErrCapabilityUnavailable, Op: "Run", Message: r.Reason}
	}
	return nil
}
