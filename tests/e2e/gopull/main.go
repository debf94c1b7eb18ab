// Command gopull pulls and unpacks an image through containerd the way CRI
// does: containerd's Go client, client.Pull with WithPullUnpack on a chosen
// snapshotter, and (unless -annotations=false) the image annotations that
// remote snapshotters read (snapshotters.AppendInfoHandlerWrapper: every
// layer's Prepare carries containerd.io/snapshot/cri.layer-digest). Registries
// are reached over plain HTTP (a local test registry). It prints one JSON
// object: the image name, its target digest and the seconds the pull took.
//
//	gopull -address /run/containerd/containerd.sock -namespace default \
//	    -snapshotter stratasnap -ref 127.0.0.1:5000/app:1
//
// Build offline against Debian's packages (GOPATH mode):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o gopull .
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/remotes/docker"
)

func main() {
	address := flag.String("address", "/run/containerd/containerd.sock", "containerd's socket")
	namespace := flag.String("namespace", "default", "containerd namespace")
	snapshotter := flag.String("snapshotter", "", "snapshotter to unpack on (containerd's default if empty)")
	ref := flag.String("ref", "", "image reference (host:port/repo:tag), pulled over plain HTTP")
	annotations := flag.Bool("annotations", true, "label each layer's Prepare with the image annotations (as CRI does)")
	flag.Parse()
	if *ref == "" {
		fmt.Fprintln(os.Stderr, "gopull: -ref is required")
		os.Exit(2)
	}
	client, err := containerd.New(*address)
	if err != nil {
		fail("connect", err)
	}
	defer client.Close()
	ctx := namespaces.WithNamespace(context.Background(), *namespace)
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(
			docker.WithPlainHTTP(docker.MatchAllHosts),
			docker.WithClient(http.DefaultClient),
		),
	})
	opts := []containerd.RemoteOpt{containerd.WithPullUnpack, containerd.WithResolver(resolver)}
	if *snapshotter != "" {
		opts = append(opts, containerd.WithPullSnapshotter(*snapshotter))
	}
	if *annotations {
		opts = append(opts, containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(*ref)))
	}
	start := time.Now()
	img, err := client.Pull(ctx, *ref, opts...)
	if err != nil {
		fail("pull", err)
	}
	seconds := time.Since(start).Seconds()
	out, _ := json.Marshal(map[string]interface{}{
		"image":   img.Name(),
		"target":  img.Target().Digest.String(),
		"seconds": seconds,
	})
	fmt.Println(string(out))
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "gopull: %s: %v\n", what, err)
	os.Exit(1)
}
