package tenkisandbox

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinel errors. Every error this package returns for a failed call is an *Error that
// matches (errors.Is) ErrSandbox and exactly one kind below, chosen from the gRPC status code
// and the words of the server's message the way Tenki's official SDKs choose theirs.
var (
	ErrSandbox = errors.New("tenki sandbox error") // every error of this package

	// configuration (raised before anything is sent)
	ErrMissingAuthToken = errors.New("missing auth token (set TENKI_API_KEY or TENKI_AUTH_TOKEN)")
	ErrInvalidAuthToken = errors.New("invalid auth token (must start with tk_)")
	ErrInvalidEndpoint  = errors.New("invalid endpoint")

	// UNAUTHENTICATED / PERMISSION_DENIED
	ErrUnauthorized     = errors.New("unauthorized")
	ErrPermissionDenied = errors.New("permission denied")

	// NOT_FOUND, by the words of the message
	ErrTemplateBuildNotFound = errors.New("template build not found")
	ErrTemplateNotFound      = errors.New("template not found")
	ErrRegistryImageNotFound = errors.New("registry image not found")
	ErrSnapshotNotFound      = errors.New("snapshot not found")
	ErrVolumeNotFound        = errors.New("volume not found")
	ErrSessionExpired        = errors.New("session expired")
	ErrFileNotFound          = errors.New("file not found")
	ErrSessionNotFound       = errors.New("session not found")

	// ALREADY_EXISTS
	ErrTemplateExists = errors.New("template already exists")
	ErrAlreadyExists  = errors.New("already exists")

	// DEADLINE_EXCEEDED (the server's or the client's own deadline)
	ErrCommandTimeout = errors.New("timed out")

	// RESOURCE_EXHAUSTED
	ErrPortLimitExceeded   = errors.New("port limit exceeded")
	ErrRateLimited         = errors.New("rate limited")
	ErrVolumeLimitExceeded = errors.New("volume limit exceeded")
	ErrCapacityUnavailable = errors.New("capacity unavailable")
	ErrQuotaExceeded       = errors.New("quota exceeded")

	// FAILED_PRECONDITION
	ErrTemplateRuntimeFailure  = errors.New("template runtime failed")
	ErrSnapshotNotDurable      = errors.New("snapshot not yet durable")
	ErrSessionTerminated       = errors.New("session terminated")
	ErrGitOperationFailed      = errors.New("git operation failed")
	ErrVolumeSyncPending       = errors.New("volume sync pending")
	ErrVolumeInUse             = errors.New("volume in use")
	ErrInboundDisabled         = errors.New("inbound access is disabled")
	ErrTemplateBuildInProgress = errors.New("template build in progress")
	ErrSSHUnavailable          = errors.New("ssh unavailable")
	ErrInvalidState            = errors.New("invalid state")

	// other codes
	ErrInvalidArgument   = errors.New("invalid argument")
	ErrUnavailable       = errors.New("unavailable")
	ErrDataPlaneNotReady = errors.New("data plane not ready")
	ErrUnimplemented     = errors.New("unimplemented")
	ErrInternal          = errors.New("internal error")

	// raised by this client while waiting
	ErrSnapshotFailed        = errors.New("snapshot failed")
	ErrSnapshotWaitTimeout   = errors.New("timed out waiting for the snapshot")
	ErrSessionWaitTimeout    = errors.New("timed out waiting for the session")
	ErrWaitReadyFailed       = errors.New("session did not become ready")
	ErrPaginationStalled     = errors.New("pagination stalled: the server returned the same page token twice")
	ErrCapabilityUnavailable = errors.New("capability unavailable")
)

// Error is what a failed call returns. errors.Is matches its Kind (one of the Err* sentinels),
// ErrSandbox, and the context's error when the call's context ended.
type Error struct {
	Kind      error      // the sentinel
	Op        string     // the RPC or client operation ("GetSnapshot", "WaitSnapshotReady")
	Code      codes.Code // the gRPC status code (codes.OK for a client-side error)
	Message   string     // the server's message, or the client's
	Retryable bool       // UNAVAILABLE and rate limits

	FailureReason string    // ErrSnapshotFailed: the snapshot's failure_reason
	Snapshot      *Snapshot // ErrSnapshotFailed: the snapshot record as last seen
	Session       *Session  // session waits: the session as last seen
	ExitCode      int       // ErrGitOperationFailed: exit_code=N from the message

	cause   error
	started bool // a Run failed after the command started
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("tenkisandbox: ")
	if e.Op != "" {
		b.WriteString(e.Op)
		b.WriteString(": ")
	}
	b.WriteString(e.Kind.Error())
	if e.Message != "" && !strings.EqualFold(e.Message, e.Kind.Error()) {
		b.WriteString(": ")
		b.WriteString(e.Message)
	}
	if e.FailureReason != "" && !strings.Contains(e.Message, e.FailureReason) {
		b.WriteString(" (failure reason: ")
		b.WriteString(e.FailureReason)
		b.WriteString(")")
	}
	if e.Code != codes.OK {
		fmt.Fprintf(&b, " [%s]", e.Code)
	}
	return b.String()
}

// Unwrap lets errors.Is/As see the kind, ErrSandbox and the underlying cause.
func (e *Error) Unwrap() []error {
	out := []error{e.Kind, ErrSandbox}
	if e.cause != nil {
		out = append(out, e.cause)
	}
	return out
}

// GRPCStatus makes status.FromError/status.Code work on our errors.
func (e *Error) GRPCStatus() *status.Status {
	if e.Code == codes.OK {
		return status.New(codes.Unknown, e.Error())
	}
	return status.New(e.Code, e.Message)
}

func clientError(op string, kind error, format string, args ...any) *Error {
	return &Error{Kind: kind, Op: op, Message: fmt.Sprintf(format, args...)}
}

var gitFailed = regexp.MustCompile(`git .*failed \(exit_code=(-?\d+)\)`)

// kindOf is the sentinel for a gRPC status: the code first, then words of the message
// (lower-cased), in the order Tenki's SDKs test them (tenki-wire.md §7).
func kindOf(code codes.Code, message string, hasRuntimeFailure bool) (kind error, retryable bool) {
	m := strings.ToLower(message)
	has := func(words ...string) bool {
		for _, w := range words {
			if strings.Contains(m, w) {
				return true
			}
		}
		return false
	}
	switch code {
	case codes.Unauthenticated:
		return ErrUnauthorized, false
	case codes.PermissionDenied:
		return ErrPermissionDenied, false
	case codes.NotFound:
		switch {
		case has("template build"):
			return ErrTemplateBuildNotFound, false
		case has("template"):
			return ErrTemplateNotFound, false
		case has("snapshot"):
			return ErrSnapshotNotFound, false
		case has("volume"):
			return ErrVolumeNotFound, false
		case has("registry image"):
			return ErrRegistryImageNotFound, false
		case has("artifact"):
			return ErrSessionExpired, false
		case has("no such file or directory"):
			return ErrFileNotFound, false
		default:
			return ErrSessionNotFound, false
		}
	case codes.AlreadyExists:
		if has("template") {
			return ErrTemplateExists, false
		}
		return ErrAlreadyExists, false
	case codes.DeadlineExceeded:
		return ErrCommandTimeout, false
	case codes.ResourceExhausted:
		switch {
		case has("maximum exposed ports"):
			return ErrPortLimitExceeded, false
		case has("rate limit"):
			return ErrRateLimited, true
		case has("volume"):
			return ErrVolumeLimitExceeded, false
		case has("capacity"):
			return ErrCapacityUnavailable, false
		default:
			return ErrQuotaExceeded, false
		}
	case codes.FailedPrecondition:
		switch {
		case hasRuntimeFailure || has("template runtime failed"):
			return ErrTemplateRuntimeFailure, false
		case has("snapshot not yet durable"):
			return ErrSnapshotNotDurable, false
		case has("terminated"):
			return ErrSessionTerminated, false
		case gitFailed.MatchString(m):
			return ErrGitOperationFailed, false
		case has("sync_pending", "sync pending"):
			return ErrVolumeSyncPending, false
		case has("volume is attached", "volume is in use"):
			return ErrVolumeInUse, false
		case has("inbound access is disabled"):
			return ErrInboundDisabled, false
		case has("template build already in progress", "build in progress"):
			return ErrTemplateBuildInProgress, false
		case has("ssh"):
			return ErrSSHUnavailable, false
		default:
			return ErrInvalidState, false
		}
	case codes.Unavailable:
		if has("ssh") {
			return ErrSSHUnavailable, true
		}
		return ErrUnavailable, true
	case codes.InvalidArgument:
		return ErrInvalidArgument, false
	case codes.Unimplemented:
		if has("404") {
			return ErrDataPlaneNotReady, true
		}
		return ErrUnimplemented, false
	case codes.Canceled:
		return context.Canceled, false
	case codes.Internal:
		return ErrInternal, false
	default:
		return ErrSandbox, false
	}
}

// mapError turns an error of a gRPC call into an *Error (nil stays nil, *Error stays as is).
func mapError(op string, ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	var own *Error
	if errors.As(err, &own) {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		if ctx != nil && ctx.Err() != nil {
			st = status.FromContextError(ctx.Err())
		} else {
			return &Error{Kind: ErrSandbox, Op: op, Message: err.Error(), cause: err}
		}
	}
	runtimeFailure := false
	for _, d := range st.Proto().GetDetails() {
		if strings.HasSuffix(d.GetTypeUrl(), "tenki.sandbox.v1.TemplateRuntimeFailure") {
			runtimeFailure = true
		}
	}
	kind, retry := kindOf(st.Code(), st.Message(), runtimeFailure)
	e := &Error{Kind: kind, Op: op, Code: st.Code(), Message: st.Message(), Retryable: retry}
	if kind == ErrGitOperationFailed {
		if m := gitFailed.FindStringSubmatch(strings.ToLower(st.Message())); m != nil {
			fmt.Sscan(m[1], &e.ExitCode)
		}
	}
	if ctx != nil && ctx.Err() != nil {
		e.cause = ctx.Err()
	}
	return e
}
