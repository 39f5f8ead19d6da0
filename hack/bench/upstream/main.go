// Command upstream is the benchmark's model server: an OpenAI-compatible endpoint that costs
// (almost) nothing, so that what a benchmark measures is the router in front of it.
//
//	upstream -addr 127.0.0.1:0 -chunks 20 -interval 50ms
//
// POST /v1/chat/completions answers at once; with "stream": true it sends -chunks content
// chunks -interval apart, a usage chunk and [DONE]. GET /health answers 200, as vLLM's does (the
// peer router vllm-router checks its workers there). It prints "listening on HOST:PORT".
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"time"
)

type request struct {
	Model  string `json:"model"`
	Stream bool   `json:"stream"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address (loopback only)")
	chunks := flag.Int("chunks", 20, "content chunks per streamed answer")
	interval := flag.Duration("interval", 50*time.Millisecond, "gap between streamed chunks")
	flag.Parse()

	listener, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintf(os.Stdout, "listening on %s\n", listener.Addr())

	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
	})
	mux.HandleFunc("/v1/models", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"object":"list","data":[{"id":"bench","object":"model"}]}`)
	})
	mux.HandleFunc("/v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		var body request
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			http.Error(w, `{"error":{"message":"bad json"}}`, http.StatusBadRequest)
			return
		}
		if !body.Stream {
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":%q,`+
				`"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],`+
				`"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}`, body.Model)
			return
		}
		flusher, ok := w.(http.Flusher)
		if !ok {
			http.Error(w, "no flusher", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		for i := 0; i < *chunks; i++ {
			if i > 0 {
				select {
				case <-time.After(*interval):
				case <-r.Context().Done():
					return // the client left: stop "generating"
				}
			}
			fmt.Fprintf(w, "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,"+
				"\"model\":%q,\"choices\":[{\"index\":0,\"delta\":{\"content\":\"t%d \"},\"finish_reason\":null}]}\n\n",
				body.Model, i)
			flusher.Flush()
		}
		fmt.Fprintf(w, "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,"+
			"\"model\":%q,\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n", body.Model)
		fmt.Fprintf(w, "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,"+
			"\"model\":%q,\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n",
			body.Model, *chunks, *chunks+5)
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
		flusher.Flush()
	})
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(server.Serve(listener))
}
