module remoteloss.example/goclient

go 1.19
