package tenkisandbox

// The wire contract: Tenki's tenki.sandbox.v1 descriptors, loaded at run time into a private
// registry (no generated code). Messages are dynamicpb messages; gRPC's proto codec marshals
// any proto.Message, so they go through grpc.ClientConn.Invoke and NewStream as they are.

import (
	_ "embed"
	"fmt"
	"sync"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// Descriptors of the MIT-licensed PyPI `tenki` 1.4.1 (FileDescriptorSet, with buf.validate and well-known deps).
//
//go:embed tenki-1.4.1.descriptor-set.binpb
var descriptorSet []byte

const (
	protoPackage = "tenki.sandbox.v1"
	// ControlService is the full name of Tenki's control-plane service.
	ControlService = protoPackage + ".SandboxService"
	// DataPlaneService is the full name of Tenki's per-session data-plane service.
	DataPlaneService = protoPackage + ".SandboxSessionDataPlaneService"
)

var (
	filesOnce sync.Once
	files     *protoregistry.Files
	filesErr  error
)

// Files is the registry built from the embedded descriptor set (it panics if the embedded
// set does not load, which a unit test rules out).
func Files() *protoregistry.Files {
	filesOnce.Do(func() {
		var fds descriptorpb.FileDescriptorSet
		if err := proto.Unmarshal(descriptorSet, &fds); err != nil {
			filesErr = fmt.Errorf("tenkisandbox: embedded descriptor set: %w", err)
			return
		}
		files, filesErr = protodesc.NewFiles(&fds)
	})
	if filesErr != nil {
		panic(filesErr)
	}
	return files
}

var (
	mdMu    sync.RWMutex
	mdCache = map[string]protoreflect.MessageDescriptor{}
)

// messageDescriptor finds a message by name; a name without a dot is in tenki.sandbox.v1.
func messageDescriptor(name string) protoreflect.MessageDescriptor {
	full := name
	if !containsDot(name) {
		full = protoPackage + "." + name
	}
	mdMu.RLock()
	md, ok := mdCache[full]
	mdMu.RUnlock()
	if ok {
		return md
	}
	d, err := Files().FindDescriptorByName(protoreflect.FullName(full))
	if err != nil {
		panic(fmt.Sprintf("tenkisandbox: no message %s in the descriptors: %v", full, err))
	}
	md, ok = d.(protoreflect.MessageDescriptor)
	if !ok {
		panic(fmt.Sprintf("tenkisandbox: %s is not a message", full))
	}
	mdMu.Lock()
	mdCache[full] = md
	mdMu.Unlock()
	return md
}

func containsDot(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == '.' {
			return true
		}
	}
	return false
}

// NewMessage is an empty dynamic message of the named type ("CreateSessionRequest" or a full name).
func NewMessage(name string) *dynamicpb.Message {
	return dynamicpb.NewMessage(messageDescriptor(name))
}

// MethodDescriptor finds a method of the control or data-plane service.
func MethodDescriptor(service, method string) (protoreflect.MethodDescriptor, error) {
	d, err := Files().FindDescriptorByName(protoreflect.FullName(service))
	if err != nil {
		return nil, err
	}
	sd, ok := d.(protoreflect.ServiceDescriptor)
	if !ok {
		return nil, fmt.Errorf("%s is not a service", service)
	}
	m := sd.Methods().ByName(protoreflect.Name(method))
	if m == nil {
		return nil, fmt.Errorf("%s has no method %s", service, method)
	}
	return m, nil
}

func methodPath(service, method string) string { return "/" + service + "/" + method }
