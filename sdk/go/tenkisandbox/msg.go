package tenkisandbox

// A thin name-based view over dynamic messages.

import (
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
)

type msg struct{ m protoreflect.Message }

func newMsg(name string) msg { return msg{NewMessage(name)} }

func wrap(m protoreflect.ProtoMessage) msg { return msg{m.ProtoReflect()} }

func (x msg) proto() *dynamicpb.Message { return x.m.Interface().(*dynamicpb.Message) }

func (x msg) fd(name string) protoreflect.FieldDescriptor {
	f := x.m.Descriptor().Fields().ByName(protoreflect.Name(name))
	if f == nil {
		panic(fmt.Sprintf("tenkisandbox: %s has no field %s", x.m.Descriptor().FullName(), name))
	}
	return f
}

func (x msg) valid() bool { return x.m != nil && x.m.IsValid() }

func (x msg) has(name string) bool { return x.valid() && x.m.Has(x.fd(name)) }

func (x msg) set(name string, v any) msg {
	f := x.fd(name)
	switch val := v.(type) {
	case string:
		x.m.Set(f, protoreflect.ValueOfString(val))
	case bool:
		x.m.Set(f, protoreflect.ValueOfBool(val))
	case int32:
		x.m.Set(f, protoreflect.ValueOfInt32(val))
	case int:
		switch f.Kind() {
		case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
			x.m.Set(f, protoreflect.ValueOfInt64(int64(val)))
		case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
			x.m.Set(f, protoreflect.ValueOfUint32(uint32(val)))
		case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
			x.m.Set(f, protoreflect.ValueOfUint64(uint64(val)))
		case protoreflect.EnumKind:
			x.m.Set(f, protoreflect.ValueOfEnum(protoreflect.EnumNumber(val)))
		default:
			x.m.Set(f, protoreflect.ValueOfInt32(int32(val)))
		}
	case int64:
		x.m.Set(f, protoreflect.ValueOfInt64(val))
	case uint32:
		x.m.Set(f, protoreflect.ValueOfUint32(val))
	case []byte:
		x.m.Set(f, protoreflect.ValueOfBytes(val))
	case []string:
		l := x.m.Mutable(f).List()
		for _, s := range val {
			l.Append(protoreflect.ValueOfString(s))
		}
	case map[string]string:
		mp := x.m.Mutable(f).Map()
		for k, s := range val {
			mp.Set(protoreflect.ValueOfString(k).MapKey(), protoreflect.ValueOfString(s))
		}
	case msg:
		x.m.Set(f, protoreflect.ValueOfMessage(val.m))
	case time.Time:
		ts := x.m.NewField(f).Message()
		ts.Set(ts.Descriptor().Fields().ByName("seconds"), protoreflect.ValueOfInt64(val.Unix()))
		ts.Set(ts.Descriptor().Fields().ByName("nanos"), protoreflect.ValueOfInt32(int32(val.Nanosecond())))
		x.m.Set(f, protoreflect.ValueOfMessage(ts))
	case time.Duration:
		d := x.m.NewField(f).Message()
		d.Set(d.Descriptor().Fields().ByName("seconds"), protoreflect.ValueOfInt64(int64(val/time.Second)))
		d.Set(d.Descriptor().Fields().ByName("nanos"), protoreflect.ValueOfInt32(int32(val%time.Second)))
		x.m.Set(f, protoreflect.ValueOfMessage(d))
	default:
		panic(fmt.Sprintf("tenkisandbox: cannot set %s from %T", name, v))
	}
	return x
}

// mutable is the sub-message at name, created if unset.
func (x msg) mutable(name string) msg { return msg{x.m.Mutable(x.fd(name)).Message()} }

// appendMsg appends a new element to the repeated message field name and returns it.
func (x msg) appendMsg(name string) msg {
	l := x.m.Mutable(x.fd(name)).List()
	e := l.NewElement()
	l.Append(e)
	return msg{e.Message()}
}

func (x msg) get(name string) protoreflect.Value {
	if !x.valid() {
		return x.fd(name).Default()
	}
	return x.m.Get(x.fd(name))
}

func (x msg) str(name string) string {
	if !x.valid() {
		return ""
	}
	return x.get(name).String()
}

func (x msg) int(name string) int64 {
	if !x.valid() {
		return 0
	}
	v := x.get(name)
	switch x.fd(name).Kind() {
	case protoreflect.Uint32Kind, protoreflect.Uint64Kind, protoreflect.Fixed32Kind, protoreflect.Fixed64Kind:
		return int64(v.Uint())
	case protoreflect.EnumKind:
		return int64(v.Enum())
	default:
		return v.Int()
	}
}

func (x msg) boolean(name string) bool { return x.valid() && x.get(name).Bool() }

func (x msg) bytes(name string) []byte {
	if !x.valid() {
		return nil
	}
	return x.get(name).Bytes()
}

func (x msg) sub(name string) msg {
	if !x.valid() || !x.m.Has(x.fd(name)) {
		return msg{}
	}
	return msg{x.m.Get(x.fd(name)).Message()}
}

func (x msg) list(name string) []protoreflect.Value {
	if !x.valid() {
		return nil
	}
	l := x.get(name).List()
	out := make([]protoreflect.Value, l.Len())
	for i := range out {
		out[i] = l.Get(i)
	}
	return out
}

func (x msg) strs(name string) []string {
	var out []string
	for _, v := range x.list(name) {
		out = append(out, v.String())
	}
	return out
}

func (x msg) msgs(name string) []msg {
	var out []msg
	for _, v := range x.list(name) {
		out = append(out, msg{v.Message()})
	}
	return out
}

func (x msg) strMap(name string) map[string]string {
	if !x.valid() {
		return nil
	}
	mp := x.get(name).Map()
	if mp.Len() == 0 {
		return nil
	}
	out := make(map[string]string, mp.Len())
	mp.Range(func(k protoreflect.MapKey, v protoreflect.Value) bool {
		out[k.String()] = v.String()
		return true
	})
	return out
}

// enumName is the enum value's name without prefix ("SESSION_STATE_RUNNING" → "RUNNING").
func (x msg) enumName(name, prefix string) string {
	if !x.valid() {
		return "UNSPECIFIED"
	}
	f := x.fd(name)
	n := x.get(name).Enum()
	ev := f.Enum().Values().ByNumber(n)
	if ev == nil {
		return fmt.Sprintf("%d", n)
	}
	return strings.TrimPrefix(string(ev.Name()), prefix)
}

// timestamp reads a google.protobuf.Timestamp field; the zero time when unset.
func (x msg) timestamp(name string) time.Time {
	t := x.sub(name)
	if !t.valid() {
		return time.Time{}
	}
	return time.Unix(t.int("seconds"), t.int("nanos")).UTC()
}

func (x msg) optTimestamp(name string) *time.Time {
	t := x.timestamp(name)
	if t.IsZero() {
		return nil
	}
	return &t
}

// oneofCase is the name of the set field in the oneof, or "".
func (x msg) oneofCase(oneof string) string {
	if !x.valid() {
		return ""
	}
	o := x.m.Descriptor().Oneofs().ByName(protoreflect.Name(oneof))
	if o == nil {
		return ""
	}
	f := x.m.WhichOneof(o)
	if f == nil {
		return ""
	}
	return string(f.Name())
}
