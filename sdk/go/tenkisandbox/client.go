// Package tenkisandbox is a Go client for Tenki Sandbox's gRPC wire (tenki.sandbox.v1): the
// control plane SandboxService and the per-session data plane SandboxSessionDataPlaneService.
// It speaks to Tenki or to a self-hosted `tenki serve` (its grpc_endpoint) alike.
//
//	client, err := tenkisandbox.NewClientFromEnv() // TENKI_API_ENDPOINT, TENKI_API_KEY
//	session, err := client.Create(ctx, tenkisandbox.WithName("demo"))
//	defer client.Terminate(ctx, session.ID)
//	snapshot, err := client.CreateSnapshotAndWait(ctx, session.ID, "baseline", nil,
//		tenkisandbox.DefaultSnapshotCreateTimeout)
//
// Messages are built at run time from Tenki's descriptors (embedded); there is no generated code.
package tenkisandbox

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

const (
	// DefaultEndpoint is Tenki's hosted API.
	DefaultEndpoint = "https://api.tenki.cloud"
	// DefaultSessionWaitTimeout bounds Create's wait for RUNNING unless WithWaitTimeout says otherwise.
	DefaultSessionWaitTimeout = 5 * time.Minute
	// DefaultSnapshotCreateTimeout is the usual bound for CreateSnapshotAndWait.
	DefaultSnapshotCreateTimeout = 10 * time.Minute
	// DefaultSnapshotWaitTimeout is used by WaitSnapshotReady when given a timeout <= 0.
	DefaultSnapshotWaitTimeout = 5 * time.Minute

	pollInterval = 500 * time.Millisecond
	pageSize     = 100
	// Version of this client.
	Version = "0.1.0"
)

// Client talks to one Tenki endpoint. It is safe for concurrent use; Close it when done.
type Client struct {
	endpoint  string
	authToken string
	timeout   time.Duration // per unary call; 0 = none
	tlsConfig *tls.Config
	dialOpts  []grpc.DialOption

	mu     sync.Mutex
	conns  map[string]*grpc.ClientConn // by endpoint URL
	routes map[string]*route           // data-plane credentials by session id
	closed bool
}

type config struct {
	endpoint  string
	authToken string
	timeout   time.Duration
	tlsConfig *tls.Config
	dialOpts  []grpc.DialOption
}

// Option configures NewClient.
type Option func(*config)

// WithEndpoint sets the API base URL: http://host:port (cleartext HTTP/2), https://host[:port]
// (TLS), or host:port (TLS). Default: TENKI_API_ENDPOINT, TENKI_API_URL, then DefaultEndpoint.
func WithEndpoint(endpoint string) Option { return func(c *config) { c.endpoint = endpoint } }

// WithAPIKey sets the API key (tk_…). Default: TENKI_AUTH_TOKEN, then TENKI_API_KEY.
func WithAPIKey(key string) Option { return func(c *config) { c.authToken = key } }

// WithAuthToken is WithAPIKey.
func WithAuthToken(token string) Option { return WithAPIKey(token) }

// WithTimeout bounds each unary call (streams and waits have their own bounds). Default: none.
func WithTimeout(d time.Duration) Option { return func(c *config) { c.timeout = d } }

// WithTLSConfig sets the TLS configuration for https endpoints (e.g. a private CA).
func WithTLSConfig(t *tls.Config) Option { return func(c *config) { c.tlsConfig = t } }

// WithDialOptions adds gRPC dial options to every connection the client opens.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) { c.dialOpts = append(c.dialOpts, opts...) }
}

// NewClientFromEnv builds a client from TENKI_API_ENDPOINT (or TENKI_API_URL) and
// TENKI_API_KEY (or TENKI_AUTH_TOKEN) only.
func NewClientFromEnv() (*Client, error) { return NewClient() }

// NewClient builds a client; options win over the environment. The key must start with tk_.
// Nothing is sent until the first call.
func NewClient(opts ...Option) (*Client, error) {
	var c config
	for _, o := range opts {
		o(&c)
	}
	if c.endpoint == "" {
		c.endpoint = firstEnv("TENKI_API_ENDPOINT", "TENKI_API_URL")
	}
	if c.endpoint == "" {
		c.endpoint = DefaultEndpoint
	}
	if c.authToken == "" {
		c.authToken = firstEnv("TENKI_AUTH_TOKEN", "TENKI_API_KEY")
	}
	if c.authToken == "" {
		return nil, clientError("NewClient", ErrMissingAuthToken, "")
	}
	if !strings.HasPrefix(c.authToken, "tk_") {
		return nil, clientError("NewClient", ErrInvalidAuthToken, "the key does not start with tk_")
	}
	if _, _, err := parseEndpoint(c.endpoint); err != nil {
		return nil, err
	}
	return &Client{
		endpoint: c.endpoint, authToken: c.authToken, timeout: c.timeout,
		tlsConfig: c.tlsConfig, dialOpts: c.dialOpts,
		conns: map[string]*grpc.ClientConn{}, routes: map[string]*route{},
	}, nil
}

func firstEnv(names ...string) string {
	for _, n := range names {
		if v := strings.TrimSpace(os.Getenv(n)); v != "" {
			return v
		}
	}
	return ""
}

// Endpoint is the control plane's base URL.
func (c *Client) Endpoint() string { return c.endpoint }

// Close closes every connection the client opened.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	var first error
	for k, cc := range c.conns {
		if err := cc.Close(); err != nil && first == nil {
			first = err
		}
		delete(c.conns, k)
	}
	return first
}

// parseEndpoint gives the gRPC target and whether TLS is used. http:// is cleartext h2c;
// https:// and a scheme-less host:port are TLS (as Tenki's SDKs do).
func parseEndpoint(endpoint string) (target string, useTLS bool, err error) {
	e := strings.TrimSpace(endpoint)
	if e == "" {
		return "", false, clientError("NewClient", ErrInvalidEndpoint, "empty endpoint")
	}
	if !strings.Contains(e, "://") {
		e = "https://" + e
	}
	u, perr := url.Parse(e)
	if perr != nil || u.Host == "" {
		return "", false, clientError("NewClient", ErrInvalidEndpoint, "%q: not a URL", endpoint)
	}
	switch strings.ToLower(u.Scheme) {
	case "http", "h2c", "grpc":
		useTLS = false
	case "https", "grpcs":
		useTLS = true
	default:
		return "", false, clientError("NewClient", ErrInvalidEndpoint, "%q: scheme must be http or https", endpoint)
	}
	host := u.Host
	if u.Port() == "" {
		if useTLS {
			host += ":443"
		} else {
			host += ":80"
		}
	}
	return host, useTLS, nil
}

// conn is the (shared) connection to endpoint.
func (c *Client) conn(endpoint string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, clientError("", ErrSandbox, "client is closed")
	}
	if cc, ok := c.conns[endpoint]; ok {
		return cc, nil
	}
	target, useTLS, err := parseEndpoint(endpoint)
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{
		grpc.WithUserAgent("tenki-sandbox-go/" + Version),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20), grpc.MaxCallSendMsgSize(256<<20)),
	}
	if useTLS {
		cfg := c.tlsConfig
		if cfg == nil {
			cfg = &tls.Config{}
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	opts = append(opts, c.dialOpts...)
	cc, err := grpc.NewClient("passthrough:///"+target, opts...)
	if err != nil {
		return nil, clientError("dial", ErrInvalidEndpoint, "%s: %v", endpoint, err)
	}
	c.conns[endpoint] = cc
	return cc, nil
}

// controlCtx adds the API key (the control plane's only header) and the unary timeout.
func (c *Client) controlCtx(ctx context.Context, unary bool) (context.Context, context.CancelFunc) {
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.authToken)
	if unary && c.timeout > 0 {
		return context.WithTimeout(ctx, c.timeout)
	}
	return ctx, func() {}
}

// call makes a unary control-plane call: method's request built by build, the response returned.
func (c *Client) call(ctx context.Context, method string, req msg) (msg, error) {
	cc, err := c.conn(c.endpoint)
	if err != nil {
		return msg{}, err
	}
	md, err := MethodDescriptor(ControlService, method)
	if err != nil {
		return msg{}, clientError(method, ErrSandbox, "%v", err)
	}
	if req.m.Descriptor().FullName() != md.Input().FullName() {
		panic(fmt.Sprintf("tenkisandbox: %s takes %s, not %s", method, md.Input().FullName(), req.m.Descriptor().FullName()))
	}
	cctx, cancel := c.controlCtx(ctx, true)
	defer cancel()
	out := NewMessage(string(md.Output().FullName()))
	if err := cc.Invoke(cctx, methodPath(ControlService, method), req.proto(), out); err != nil {
		return msg{}, mapError(method, cctx, err)
	}
	return wrap(out), nil
}

// Invoke makes any unary control-plane call with dynamic messages (for RPCs this package does
// not wrap): the request must be a message of the method's input type (see NewMessage).
func (c *Client) Invoke(ctx context.Context, method string, req proto.Message) (proto.Message, error) {
	out, err := c.call(ctx, method, wrap(req))
	if err != nil {
		return nil, err
	}
	return out.proto(), nil
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// eachPage calls a list RPC page after page (page_size 100, following next_page_token until it
// is empty) and hands every item of the repeated field to each; a token that does not change
// is ErrPaginationStalled.
func (c *Client) eachPage(ctx context.Context, method string, newReq func() msg, field string, each func(msg)) error {
	token := ""
	for {
		req := newReq().set("page_size", pageSize)
		if token != "" {
			req.set("page_token", token)
		}
		resp, err := c.call(ctx, method, req)
		if err != nil {
			return err
		}
		for _, m := range resp.msgs(field) {
			each(m)
		}
		next := resp.str("next_page_token")
		if next == "" {
			return nil
		}
		if next == token {
			return clientError(method, ErrPaginationStalled, "token %q", next)
		}
		token = next
	}
}
