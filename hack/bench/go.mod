module modelfleet.dev/bench

go 1.22
