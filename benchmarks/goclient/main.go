// Command goclient drives a containerd snapshots v1 server over a unix socket
// with containerd's generated Go client (SnapshotsClient) on grpc-go, the way
// containerd's proxy snapshotter calls an external snapshotter. It is the
// client half of benchmarks/grpc.py; every mode prints one JSON object.
//
//	goclient -address /run/ss.sock -mode stat -n 3000 -key K
//	goclient -address /run/ss.sock -mode stat-concurrent -c 32 -seconds 3 -key K
//	goclient -address /run/ss.sock -mode pairs -n 200 -prefix r0
//	goclient -address /run/ss.sock -mode list
//	goclient -address /run/ss.sock -mode round -n 200 -stats 2000 -prefix r0 -key K
//	goclient -address /run/ss.sock -mode mixed-concurrent -c 64 -conns 1 -seconds 3 -prefix r0 -key PARENT
//	goclient -address /run/ss.sock -mode chain -n 16 -prefix r0 -mountdir /mnt/x
//	goclient -address /run/ss.sock -mode prepares -n 200 -prefix r0
//
// round is one round of benchmarks/grpc.py: n prepare+commit pairs, then
// -stats sequential Stats of the new layers, then n removes (after -warmup
// untimed Stats of -key on the fresh connection).
//
// mixed-concurrent is benchmarks/concurrent.py's load: -c goroutines, each
// repeating prepare (on committed -key), stat, commit, stat, list of its own
// snapshots (a label filter) and remove, for -seconds; it reports ops_per_s.
//
// chain is containerd's snapshotter benchsuite shape (benchmarks/chain.py): a
// chain of -n layers, each prepared on the one below, mounted with containerd's
// mount package at -mountdir, given ten 1 MiB files and a 4-byte rewrite in the
// middle of a file of the layer below (a copy-up), unmounted and committed;
// prepare and commit are timed per layer, then the chain is removed (untimed).
//
// prepares times -n single Prepares of empty snapshots (no parent), one at a
// time, then removes them all (untimed): the p50 of one prepare.
//
// Build offline against Debian's packages (GOPATH mode):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o goclient .
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/mount"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

const refLabel = "containerd.io/snapshot.ref"

type options struct {
	address     string
	snapshotter string
	namespace   string
	mode        string
	n           int
	warmup      int
	clients     int
	conns       int
	seconds     float64
	keys        []string
	prefix      string
	remove      bool
	repeat      int
	stats       int
	serverPid   int
	mountdir    string
}

func main() {
	var o options
	var key, keysFile string
	flag.StringVar(&o.address, "address", "", "unix socket of the server (a path or unix://path)")
	flag.StringVar(&o.snapshotter, "snapshotter", "stratasnap", "the request's snapshotter field")
	flag.StringVar(&o.namespace, "namespace", "default", "containerd-namespace metadata (\"\": none)")
	flag.StringVar(&o.mode, "mode", "stat", "stat, stat-concurrent, pairs, list, round, mixed-concurrent, chain or prepares")
	flag.IntVar(&o.n, "n", 3000, "calls (stat) or prepare+commit pairs (pairs)")
	flag.IntVar(&o.warmup, "warmup", 200, "untimed calls first (stat, stat-concurrent: per client)")
	flag.IntVar(&o.clients, "c", 32, "concurrent clients (stat-concurrent)")
	flag.IntVar(&o.conns, "conns", 0, "connections the clients share (0: one per client)")
	flag.Float64Var(&o.seconds, "seconds", 3, "duration of stat-concurrent")
	flag.StringVar(&key, "key", "", "snapshot to Stat")
	flag.StringVar(&keysFile, "keys", "", "file of snapshots to Stat in turn, one per line")
	flag.StringVar(&o.prefix, "prefix", "go", "key prefix of pairs: PREFIX/extract-i, PREFIX/layer-i")
	flag.BoolVar(&o.remove, "remove", false, "pairs: then remove every PREFIX/layer-i (timed)")
	flag.IntVar(&o.repeat, "repeat", 5, "Lists (list: the median is reported)")
	flag.IntVar(&o.stats, "stats", 2000, "round: Stats of PREFIX/layer-(i%n) between the pairs and the removes")
	flag.IntVar(&o.serverPid, "server-pid", 0, "also report this process's CPU over the timed Stats")
	flag.StringVar(&o.mountdir, "mountdir", "", "chain: an empty directory to mount each layer on")
	flag.Parse()

	if o.address == "" {
		fail(fmt.Errorf("-address is required"))
	}
	if key != "" {
		o.keys = append(o.keys, key)
	}
	if keysFile != "" {
		ks, err := readLines(keysFile)
		if err != nil {
			fail(err)
		}
		o.keys = append(o.keys, ks...)
	}

	var out map[string]interface{}
	var err error
	switch o.mode {
	case "stat":
		out, err = runStat(o)
	case "stat-concurrent":
		out, err = runStatConcurrent(o)
	case "pairs":
		out, err = runPairs(o)
	case "list":
		out, err = runList(o)
	case "mixed-concurrent":
		out, err = runMixedConcurrent(o)
	case "round":
		out, err = runRound(o)
	case "chain":
		out, err = runChain(o)
	case "prepares":
		out, err = runPrepares(o)
	default:
		err = fmt.Errorf("unknown -mode %q", o.mode)
	}
	if err != nil {
		fail(err)
	}
	out["mode"] = o.mode
	out["grpc_go"] = grpc.Version
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "goclient:", err)
	os.Exit(1)
}

func readLines(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" {
			lines = append(lines, line)
		}
	}
	return lines, sc.Err()
}

// dial opens one insecure connection to the socket. grpc-go 1.33 has no
// unix resolver: the target goes through passthrough and the dialer strips
// the scheme, as containerd's own dialer does.
func dial(address string) (*grpc.ClientConn, error) {
	path := strings.TrimPrefix(address, "unix://")
	dialer := func(ctx context.Context, target string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", strings.TrimPrefix(target, "unix://"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return grpc.DialContext(ctx, "unix://"+path,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(dialer),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(16<<20),
			grpc.MaxCallSendMsgSize(16<<20),
		),
	)
}

// connect dials the socket and returns a snapshots client and the function that closes it.
func connect(address string) (snapshotsapi.SnapshotsClient, func(), error) {
	conn, err := dial(address)
	if err != nil {
		return nil, nil, err
	}
	return snapshotsapi.NewSnapshotsClient(conn), func() { conn.Close() }, nil
}

func (o options) ctx() context.Context {
	ctx := context.Background()
	if o.namespace != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "containerd-namespace", o.namespace)
	}
	return ctx
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func micros(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// pct is the p-th quantile of sorted durations, in µs.
func pct(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)) * p)
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return micros(sorted[i])
}

func sortDurations(ds []time.Duration) {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
}

func meanMicros(ds []time.Duration) float64 {
	if len(ds) == 0 {
		return 0
	}
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return micros(sum) / float64(len(ds))
}

func (o options) needKeys() error {
	if len(o.keys) == 0 {
		return fmt.Errorf("-mode %s needs -key or -keys", o.mode)
	}
	return nil
}

func runStat(o options) (map[string]interface{}, error) {
	if err := o.needKeys(); err != nil {
		return nil, err
	}
	client, closeConn, err := connect(o.address)
	if err != nil {
		return nil, err
	}
	defer closeConn()
	ctx := o.ctx()
	stat := func(i int) error {
		_, err := client.Stat(ctx, &snapshotsapi.StatSnapshotRequest{
			Snapshotter: o.snapshotter, Key: o.keys[i%len(o.keys)],
		})
		return err
	}
	for i := 0; i < o.warmup; i++ {
		if err := stat(i); err != nil {
			return nil, err
		}
	}
	lat := make([]time.Duration, o.n)
	scpu0 := procCPU(o.serverPid)
	cpu0 := cpuSeconds()
	start := time.Now()
	for i := 0; i < o.n; i++ {
		t0 := time.Now()
		if err := stat(i); err != nil {
			return nil, err
		}
		lat[i] = time.Since(t0)
	}
	wall := time.Since(start)
	cpu := cpuSeconds() - cpu0
	mean := meanMicros(lat)
	sortDurations(lat)
	out := map[string]interface{}{
		"n":             o.n,
		"p50_us":        pct(lat, 0.5),
		"p99_us":        pct(lat, 0.99),
		"mean_us":       mean,
		"calls_per_s":   float64(o.n) / wall.Seconds(),
		"client_cpu_us": cpu / float64(o.n) * 1e6,
		"wall_s":        wall.Seconds(),
	}
	serverCPU(o, scpu0, o.n, out)
	return out, nil
}

func runStatConcurrent(o options) (map[string]interface{}, error) {
	if err := o.needKeys(); err != nil {
		return nil, err
	}
	if o.clients < 1 {
		return nil, fmt.Errorf("-c must be at least 1")
	}
	nconns := o.conns
	if nconns <= 0 || nconns > o.clients {
		nconns = o.clients
	}
	clients := make([]snapshotsapi.SnapshotsClient, nconns)
	for i := range clients {
		client, closeConn, err := connect(o.address)
		if err != nil {
			return nil, err
		}
		defer closeConn()
		clients[i] = client
	}
	ctx := o.ctx()

	var (
		ready, done sync.WaitGroup
		stop        int32
		firstErr    error
		errOnce     sync.Once
	)
	begin := make(chan struct{})
	counts := make([]int, o.clients)
	lats := make([][]time.Duration, o.clients)
	ready.Add(o.clients)
	done.Add(o.clients)
	for w := 0; w < o.clients; w++ {
		go func(w int) {
			defer done.Done()
			client := clients[w%nconns]
			i := w
			stat := func() error {
				_, err := client.Stat(ctx, &snapshotsapi.StatSnapshotRequest{
					Snapshotter: o.snapshotter, Key: o.keys[i%len(o.keys)],
				})
				i += 7
				return err
			}
			var werr error
			for k := 0; k < o.warmup/o.clients+1 && werr == nil; k++ {
				werr = stat()
			}
			ready.Done()
			<-begin
			lat := make([]time.Duration, 0, 4096)
			for werr == nil && atomic.LoadInt32(&stop) == 0 {
				t0 := time.Now()
				werr = stat()
				lat = append(lat, time.Since(t0))
			}
			if werr != nil {
				errOnce.Do(func() { firstErr = werr })
				return
			}
			counts[w] = len(lat)
			lats[w] = lat
		}(w)
	}
	ready.Wait()
	scpu0 := procCPU(o.serverPid)
	cpu0 := cpuSeconds()
	start := time.Now()
	close(begin)
	time.Sleep(time.Duration(o.seconds * float64(time.Second)))
	atomic.StoreInt32(&stop, 1)
	done.Wait()
	wall := time.Since(start)
	cpu := cpuSeconds() - cpu0
	if firstErr != nil {
		return nil, firstErr
	}
	total := 0
	var all []time.Duration
	for w := range counts {
		total += counts[w]
		all = append(all, lats[w]...)
	}
	sortDurations(all)
	out := map[string]interface{}{
		"clients":       o.clients,
		"connections":   nconns,
		"calls":         total,
		"calls_per_s":   float64(total) / wall.Seconds(),
		"p50_us":        pct(all, 0.5),
		"p99_us":        pct(all, 0.99),
		"client_cpu_us": cpu / float64(max(total, 1)) * 1e6,
		"client_cores":  cpu / wall.Seconds(),
		"wall_s":        wall.Seconds(),
	}
	if scpu := procCPU(o.serverPid); scpu0 >= 0 && scpu >= 0 {
		out["server_cores"] = (scpu - scpu0) / wall.Seconds()
		serverCPU(o, scpu0, total, out)
	}
	return out, nil
}

func max(a, b int) int {
	if a > b {
		return a
	}
	return b
}

func runPairs(o options) (map[string]interface{}, error) {
	client, closeConn, err := connect(o.address)
	if err != nil {
		return nil, err
	}
	defer closeConn()
	ctx := o.ctx()
	out, err := pairs(client, ctx, o)
	if err != nil {
		return nil, err
	}
	if o.remove {
		if err := removeLayers(client, ctx, o, out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// pairs runs o.n prepare+commit pairs (PREFIX/extract-i committed as
// PREFIX/layer-i, no parent, one label) and reports their times.
func pairs(client snapshotsapi.SnapshotsClient, ctx context.Context, o options) (map[string]interface{}, error) {
	prep := make([]time.Duration, o.n)
	commit := make([]time.Duration, o.n)
	pair := make([]time.Duration, o.n)
	for i := 0; i < o.n; i++ {
		ref := fmt.Sprintf("%s-%d", o.prefix, i)
		extract := fmt.Sprintf("%s/extract-%d", o.prefix, i)
		t0 := time.Now()
		if _, err := client.Prepare(ctx, &snapshotsapi.PrepareSnapshotRequest{
			Snapshotter: o.snapshotter, Key: extract, Labels: map[string]string{refLabel: ref},
		}); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", extract, err)
		}
		t1 := time.Now()
		if _, err := client.Commit(ctx, &snapshotsapi.CommitSnapshotRequest{
			Snapshotter: o.snapshotter, Name: fmt.Sprintf("%s/layer-%d", o.prefix, i),
			Key: extract, Labels: map[string]string{refLabel: ref},
		}); err != nil {
			return nil, fmt.Errorf("commit %s: %w", extract, err)
		}
		t2 := time.Now()
		prep[i], commit[i], pair[i] = t1.Sub(t0), t2.Sub(t1), t2.Sub(t0)
	}
	out := map[string]interface{}{
		"n":               o.n,
		"pair_mean_us":    meanMicros(pair),
		"prepare_mean_us": meanMicros(prep),
		"commit_mean_us":  meanMicros(commit),
	}
	sortDurations(pair)
	out["pair_p50_us"] = pct(pair, 0.5)
	out["pair_p99_us"] = pct(pair, 0.99)
	return out, nil
}

// removeLayers removes PREFIX/layer-0..n-1 and reports the mean time.
func removeLayers(client snapshotsapi.SnapshotsClient, ctx context.Context, o options, out map[string]interface{}) error {
	t0 := time.Now()
	for i := 0; i < o.n; i++ {
		name := fmt.Sprintf("%s/layer-%d", o.prefix, i)
		if _, err := client.Remove(ctx, &snapshotsapi.RemoveSnapshotRequest{
			Snapshotter: o.snapshotter, Key: name,
		}); err != nil {
			return fmt.Errorf("remove %s: %w", name, err)
		}
	}
	out["remove_mean_us"] = micros(time.Since(t0)) / float64(max(o.n, 1))
	return nil
}

func runList(o options) (map[string]interface{}, error) {
	client, closeConn, err := connect(o.address)
	if err != nil {
		return nil, err
	}
	defer closeConn()
	ctx := o.ctx()
	var times []time.Duration
	count, messages := 0, 0
	for r := 0; r < max(o.repeat, 1); r++ {
		t0 := time.Now()
		stream, err := client.List(ctx, &snapshotsapi.ListSnapshotsRequest{Snapshotter: o.snapshotter})
		if err != nil {
			return nil, err
		}
		count, messages = 0, 0
		for {
			resp, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				return nil, err
			}
			messages++
			count += len(resp.Info)
		}
		times = append(times, time.Since(t0))
	}
	sortDurations(times)
	return map[string]interface{}{
		"repeat":   len(times),
		"infos":    count,
		"messages": messages,
		"median_s": times[len(times)/2].Seconds(),
		"min_s":    times[0].Seconds(),
	}, nil
}

// procCPU is utime+stime of process pid (all its threads) in seconds, from
// /proc (clock ticks: meaningful over many calls only); -1 without a pid.
func procCPU(pid int) float64 {
	if pid <= 0 {
		return -1
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	s := string(data)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 13 {
		return -1
	}
	var utime, stime float64
	fmt.Sscan(fields[11], &utime)
	fmt.Sscan(fields[12], &stime)
	return (utime + stime) / clockTicks
}

// clockTicks is USER_HZ, 100 on every Linux architecture Go supports.
const clockTicks = 100

func serverCPU(o options, before float64, calls int, out map[string]interface{}) {
	after := procCPU(o.serverPid)
	if before < 0 || after < 0 || calls == 0 {
		return
	}
	out["server_cpu_us"] = (after - before) / float64(calls) * 1e6
}

func runRound(o options) (map[string]interface{}, error) {
	client, closeConn, err := connect(o.address)
	if err != nil {
		return nil, err
	}
	defer closeConn()
	ctx := o.ctx()
	for i := 0; i < o.warmup && len(o.keys) > 0; i++ {
		if _, err := client.Stat(ctx, &snapshotsapi.StatSnapshotRequest{
			Snapshotter: o.snapshotter, Key: o.keys[i%len(o.keys)],
		}); err != nil {
			return nil, err
		}
	}
	out, err := pairs(client, ctx, o)
	if err != nil {
		return nil, err
	}
	lat := make([]float64, o.stats)
	var sum time.Duration
	cpu0 := procCPU(o.serverPid)
	for i := 0; i < o.stats; i++ {
		key := fmt.Sprintf("%s/layer-%d", o.prefix, i%max(o.n, 1))
		t0 := time.Now()
		if _, err := client.Stat(ctx, &snapshotsapi.StatSnapshotRequest{
			Snapshotter: o.snapshotter, Key: key,
		}); err != nil {
			return nil, fmt.Errorf("stat %s: %w", key, err)
		}
		d := time.Since(t0)
		sum += d
		lat[i] = micros(d)
	}
	serverCPU(o, cpu0, o.stats, out)
	out["stat_mean_us"] = micros(sum) / float64(max(o.stats, 1))
	out["stat_lat_us"] = lat
	if err := removeLayers(client, ctx, o, out); err != nil {
		return nil, err
	}
	return out, nil
}

func runMixedConcurrent(o options) (map[string]interface{}, error) {
	if err := o.needKeys(); err != nil {
		return nil, err
	}
	if o.clients < 1 {
		return nil, fmt.Errorf("-c must be at least 1")
	}
	nconns := o.conns
	if nconns <= 0 || nconns > o.clients {
		nconns = o.clients
	}
	clients := make([]snapshotsapi.SnapshotsClient, nconns)
	for i := range clients {
		client, closeConn, err := connect(o.address)
		if err != nil {
			return nil, err
		}
		defer closeConn()
		clients[i] = client
	}
	ctx := o.ctx()
	parent := o.keys[0]
	var (
		done     sync.WaitGroup
		stop     int32
		firstErr error
		errOnce  sync.Once
	)
	begin := make(chan struct{})
	counts := make([]int, o.clients)
	done.Add(o.clients)
	for w := 0; w < o.clients; w++ {
		go func(w int) {
			defer done.Done()
			client := clients[w%nconns]
			tag := fmt.Sprintf("%s-%d", o.prefix, w)
			labels := map[string]string{"client": tag}
			filter := fmt.Sprintf(`labels."client"==%s`, tag)
			sn := o.snapshotter
			cycle := func(i int) error {
				key, name := fmt.Sprintf("%s-a%d", tag, i), fmt.Sprintf("%s-c%d", tag, i)
				if _, err := client.Prepare(ctx, &snapshotsapi.PrepareSnapshotRequest{
					Snapshotter: sn, Key: key, Parent: parent, Labels: labels}); err != nil {
					return err
				}
				if _, err := client.Stat(ctx, &snapshotsapi.StatSnapshotRequest{Snapshotter: sn, Key: key}); err != nil {
					return err
				}
				if _, err := client.Commit(ctx, &snapshotsapi.CommitSnapshotRequest{
					Snapshotter: sn, Name: name, Key: key, Labels: labels}); err != nil {
					return err
				}
				if _, err := client.Stat(ctx, &snapshotsapi.StatSnapshotRequest{Snapshotter: sn, Key: name}); err != nil {
					return err
				}
				stream, err := client.List(ctx, &snapshotsapi.ListSnapshotsRequest{Snapshotter: sn, Filters: []string{filter}})
				if err != nil {
					return err
				}
				for {
					if _, err := stream.Recv(); err == io.EOF {
						break
					} else if err != nil {
						return err
					}
				}
				_, err = client.Remove(ctx, &snapshotsapi.RemoveSnapshotRequest{Snapshotter: sn, Key: name})
				return err
			}
			<-begin
			var werr error
			for i := 0; werr == nil && atomic.LoadInt32(&stop) == 0; i++ {
				if werr = cycle(i); werr == nil {
					counts[w] += 6
				}
			}
			if werr != nil {
				errOnce.Do(func() { firstErr = werr })
			}
		}(w)
	}
	t0 := time.Now()
	close(begin)
	time.Sleep(time.Duration(o.seconds * float64(time.Second)))
	atomic.StoreInt32(&stop, 1)
	done.Wait()
	elapsed := time.Since(t0).Seconds()
	if firstErr != nil {
		return nil, firstErr
	}
	total := 0
	for _, c := range counts {
		total += c
	}
	return map[string]interface{}{"ops_per_s": float64(total) / elapsed, "ops": total, "clients": o.clients, "conns": nconns}, nil
}

// durations reports ds (in µs) with their median under name_p50_us.
func durations(out map[string]interface{}, name string, ds []time.Duration) {
	us := make([]float64, len(ds))
	for i, d := range ds {
		us[i] = micros(d)
	}
	out[name+"_us"] = us
	sorted := append([]time.Duration(nil), ds...)
	sortDurations(sorted)
	out[name+"_p50_us"] = pct(sorted, 0.5)
	out[name+"_p99_us"] = pct(sorted, 0.99)
}

func runChain(o options) (map[string]interface{}, error) {
	if o.mountdir == "" {
		return nil, fmt.Errorf("-mode chain needs -mountdir")
	}
	client, closeConn, err := connect(o.address)
	if err != nil {
		return nil, err
	}
	defer closeConn()
	ctx := o.ctx()
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	prep := make([]time.Duration, o.n)
	commit := make([]time.Duration, o.n)
	parent := ""
	var names []string
	for layer := 0; layer < o.n; layer++ {
		key := fmt.Sprintf("%s/active-%d", o.prefix, layer)
		name := fmt.Sprintf("%s/layer-%d", o.prefix, layer)
		t0 := time.Now()
		resp, err := client.Prepare(ctx, &snapshotsapi.PrepareSnapshotRequest{
			Snapshotter: o.snapshotter, Key: key, Parent: parent,
		})
		if err != nil {
			return nil, fmt.Errorf("prepare %s: %w", key, err)
		}
		prep[layer] = time.Since(t0)
		if err := fillLayer(resp.Mounts, o.mountdir, layer, data); err != nil {
			return nil, fmt.Errorf("layer %d: %w", layer, err)
		}
		t1 := time.Now()
		if _, err := client.Commit(ctx, &snapshotsapi.CommitSnapshotRequest{
			Snapshotter: o.snapshotter, Name: name, Key: key,
		}); err != nil {
			return nil, fmt.Errorf("commit %s: %w", key, err)
		}
		commit[layer] = time.Since(t1)
		names = append(names, name)
		parent = name
	}
	for i := len(names) - 1; i >= 0; i-- {
		if _, err := client.Remove(ctx, &snapshotsapi.RemoveSnapshotRequest{
			Snapshotter: o.snapshotter, Key: names[i],
		}); err != nil {
			return nil, fmt.Errorf("remove %s: %w", names[i], err)
		}
	}
	out := map[string]interface{}{"n": o.n}
	durations(out, "prepare", prep)
	durations(out, "commit", commit)
	return out, nil
}

// fillLayer mounts a prepared layer at dir, writes what the benchsuite
// writes, and unmounts it again.
func fillLayer(pm []*types.Mount, dir string, layer int, data []byte) error {
	mounts := make([]mount.Mount, len(pm))
	for i, m := range pm {
		mounts[i] = mount.Mount{Type: m.Type, Source: m.Source, Options: m.Options}
	}
	if err := mount.All(mounts, dir); err != nil {
		return err
	}
	werr := func() error {
		for i := 0; i < 10; i++ {
			if err := os.WriteFile(fmt.Sprintf("%s/l%d-f%d", dir, layer, i), data, 0o644); err != nil {
				return err
			}
		}
		if layer == 0 {
			return nil
		}
		f, err := os.OpenFile(fmt.Sprintf("%s/l%d-f0", dir, layer-1), os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		if _, err := f.WriteAt([]byte("abcd"), int64(len(data)/2)); err != nil {
			f.Close()
			return err
		}
		return f.Close()
	}()
	if err := mount.UnmountAll(dir, 0); err != nil && werr == nil {
		werr = err
	}
	return werr
}

func runPrepares(o options) (map[string]interface{}, error) {
	client, closeConn, err := connect(o.address)
	if err != nil {
		return nil, err
	}
	defer closeConn()
	ctx := o.ctx()
	for i := 0; i < o.warmup; i++ {
		if _, err := client.Stat(ctx, &snapshotsapi.StatSnapshotRequest{
			Snapshotter: o.snapshotter, Key: "warm-up",
		}); err != nil && !strings.Contains(err.Error(), "not found") {
			return nil, err
		}
	}
	prep := make([]time.Duration, o.n)
	for i := 0; i < o.n; i++ {
		key := fmt.Sprintf("%s/single-%d", o.prefix, i)
		t0 := time.Now()
		if _, err := client.Prepare(ctx, &snapshotsapi.PrepareSnapshotRequest{
			Snapshotter: o.snapshotter, Key: key,
		}); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", key, err)
		}
		prep[i] = time.Since(t0)
	}
	for i := 0; i < o.n; i++ {
		key := fmt.Sprintf("%s/single-%d", o.prefix, i)
		if _, err := client.Remove(ctx, &snapshotsapi.RemoveSnapshotRequest{
			Snapshotter: o.snapshotter, Key: key,
		}); err != nil {
			return nil, fmt.Errorf("remove %s: %w", key, err)
		}
	}
	out := map[string]interface{}{"n": o.n}
	durations(out, "prepare", prep)
	return out, nil
}
